"""The sharpness metric (variance of the Laplacian in a box) and the per-frame trend, against
hand computations and OpenCV."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gstalk.metrics.sharpness import laplacian_energy, laplacian_variance, linear_trend, sharpness_ratio


def test_laplacian_variance_of_one_bright_pixel_by_hand():
    # a 5x5 grey image, one pixel at 1 in the centre: the valid 3x3 Laplacian holds -4 at the
    # centre, +1 at its four neighbours and 0 at the four corners; mean 0, variance 20/9
    img = torch.zeros(1, 5, 5, 3)
    img[0, 2, 2] = 1.0
    v = laplacian_variance(img, torch.tensor([[0.0, 0.0, 5.0, 5.0]]))
    assert v.item() == pytest.approx(20.0 / 9.0, rel=1e-12)
    # the same pixel at 0.5 in the red channel only: luma 0.299 x 0.5, variance scales by its square
    img2 = torch.zeros(1, 5, 5, 3)
    img2[0, 2, 2, 0] = 0.5
    assert laplacian_variance(img2, torch.tensor([[0.0, 0.0, 5.0, 5.0]])).item() == \
        pytest.approx(20.0 / 9.0 * (0.299 * 0.5) ** 2, rel=1e-6)


def test_laplacian_variance_matches_opencv_inside_a_box():
    import cv2

    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 40, 50, 3, generator=g)
    box = torch.tensor([[7.0, 5.0, 31.0, 29.0]])  # x 7..30, y 5..28
    luma = (img[0].double().numpy() * np.array([0.299, 0.587, 0.114])).sum(-1)
    crop = luma[5:29, 7:31]
    lap = cv2.Laplacian(crop, cv2.CV_64F, ksize=1)[1:-1, 1:-1]  # the valid part
    assert laplacian_variance(img, box).item() == pytest.approx(lap.var(), rel=1e-9)


def test_laplacian_energy_matches_opencv_with_zero_padding():
    import cv2

    img = torch.rand(2, 17, 23, 3, generator=torch.Generator().manual_seed(4))
    got = laplacian_energy(img)
    assert got.shape == (2, 17, 23) and got.dtype == torch.float64
    for k in range(2):
        luma = (img[k].double().numpy() * np.array([0.299, 0.587, 0.114])).sum(-1)
        lap = cv2.Laplacian(luma, cv2.CV_64F, ksize=1, borderType=cv2.BORDER_CONSTANT)
        np.testing.assert_allclose(got[k].numpy(), lap ** 2, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError):
        laplacian_energy(img[..., :2])


def test_boxes_are_clamped_and_tiny_boxes_give_nan():
    img = torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(0))
    inside = laplacian_variance(img[:1], torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
    outside = laplacian_variance(img[:1], torch.tensor([[-10.0, -4.0, 35.0, 60.0]]))
    assert outside.item() == pytest.approx(inside.item())
    v = laplacian_variance(img, torch.tensor([[0.0, 0.0, 20.0, 20.0], [3.0, 3.0, 5.0, 20.0]]))
    assert math.isfinite(v[0].item()) and math.isnan(v[1].item())
    with pytest.raises(ValueError):
        laplacian_variance(img, torch.zeros(3, 4))


def test_sharpness_ratio_is_one_for_the_truth_and_falls_with_blur():
    import cv2

    rng = np.random.default_rng(1)
    truth = rng.random((3, 64, 64, 3)).astype(np.float32)
    truth = np.stack([cv2.GaussianBlur(t, (0, 0), 0.7) for t in truth])  # image-like, not white noise
    blurred = np.stack([cv2.GaussianBlur(t, (0, 0), 1.5) for t in truth])
    boxes = torch.tensor([[8.0, 8.0, 56.0, 56.0]] * 3)
    t, b = torch.from_numpy(truth), torch.from_numpy(blurred)
    same = sharpness_ratio(t, t, boxes)
    assert same["sharpness_ratio"] == pytest.approx(1.0)
    assert same["face_sharpness"] == pytest.approx(float(laplacian_variance(t, boxes).mean()))
    soft = sharpness_ratio(b, t, boxes)
    assert soft["sharpness_ratio"] < 0.5
    assert soft["face_sharpness_truth"] == pytest.approx(same["face_sharpness_truth"])


def test_linear_trend_of_a_line_and_with_gaps():
    y = 30.0 - 0.1 * np.arange(46)
    tr = linear_trend(y, fps=25.0)
    assert tr["slope_per_frame"] == pytest.approx(-0.1)
    assert tr["trend"] == pytest.approx(-4.5)
    assert tr["slope_per_s"] == pytest.approx(-2.5)
    y2 = y.copy()
    y2[[3, 10]] = [np.inf, np.nan]  # a perfect frame and a gap are left out of the fit
    assert linear_trend(y2)["trend"] == pytest.approx(-4.5)
    assert math.isnan(linear_trend([1.0])["trend"])
    flat = linear_trend(np.full(20, 31.0) + np.sin(np.arange(20)) * 0.01)
    assert abs(flat["trend"]) < 0.05


@pytest.mark.slow
def test_sharpness_budget_splits_the_face_box(trained_ws, benchmark_script):
    """``benchmarks/sharpness_budget.py`` on a trained workspace: blurring the truth loses
    more detail the wider the blur, the regions tile the face box, and their energies add up
    to the box's own (the same squared Laplacian, summed over the box's pixels)."""
    mod = benchmark_script("sharpness_budget")
    r = mod.budget(str(trained_ws))
    ratios = [r["blur"][f"{s}px"]["ratio"] for s in mod.BLURS]
    assert 1.0 > ratios[0] > ratios[1] > ratios[2] > 0.0
    assert r["blur"]["0.4px"]["psnr"] > r["blur"]["0.7px"]["psnr"] > 30.0
    regions = r["regions"].values()
    assert sum(v["share_of_box"] for v in regions) == pytest.approx(1.0)
    assert all(v["eval_background"] >= 0 and v["truth"] >= 0 for v in regions)
    # the head is the same over both backgrounds: where it is opaque, nearly so are the energies
    # (the Laplacian at the opaque edge reads a neighbour or two outside)
    opaque = r["regions"]["opaque"]
    assert opaque["eval_background"] == pytest.approx(opaque["own_background"], rel=0.02)
    # the regions' energies add up to the box's, computed here directly
    from gstalk.dataset import build_frameset, load_tracks, split_indices
    from gstalk.workspace import Workspace

    ws = Workspace.open(trained_ws)
    frames = list(split_indices(ws)[1])
    gt = build_frameset(ws, frames).images.float() / 255.0
    boxes = load_tracks(ws).face_box[torch.tensor(frames)]
    inside = mod.box_mask(boxes, gt.shape[1], gt.shape[2])
    direct = float(laplacian_energy(gt)[inside].mean())
    assert sum(v["truth"] for v in regions) == pytest.approx(direct, rel=1e-4)
