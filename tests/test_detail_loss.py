"""The phase-free detail loss (gstalk.train.losses.detail_loss) against a hand computation,
its gradient against finite differences, and what it asks of a render."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gstalk.metrics.sharpness import laplacian_energy
from gstalk.train.losses import detail_loss, local_detail_energy, scaled_window


def energy_by_hand(img: np.ndarray, window: int) -> np.ndarray:
    """[H, W, 3] -> [H, W]: the squared 4-neighbour Laplacian of the BT.601 luma with the
    border replicated, averaged over the window's pixels that lie inside the image."""
    luma = img @ np.array([0.299, 0.587, 0.114])
    p = np.pad(luma, 1, mode="edge")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * luma
    sq = lap ** 2
    h, w = sq.shape
    r = window // 2
    out = np.zeros_like(sq)
    for y in range(h):
        for x in range(w):
            out[y, x] = sq[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1].mean()
    return out


def test_local_detail_energy_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    img = rng.random((2, 9, 11, 3))
    got = local_detail_energy(torch.from_numpy(img), 5).numpy()
    assert got.shape == (2, 1, 9, 11)
    for k in range(2):
        np.testing.assert_allclose(got[k, 0], energy_by_hand(img[k], 5), rtol=1e-10, atol=1e-12)


def test_local_detail_energy_is_the_metrics_laplacian_inside_the_image():
    """Away from the border the per-pixel energy (window 1) is eval's sharpness energy."""
    img = torch.rand(1, 12, 12, 3, dtype=torch.float64)
    ours = local_detail_energy(img, 1)[0, 0, 1:-1, 1:-1]
    metric = laplacian_energy(img)[0, 1:-1, 1:-1]
    torch.testing.assert_close(ours, metric)


def test_detail_loss_is_zero_for_the_same_image_and_ignores_the_phase():
    rng = np.random.default_rng(1)
    stripes = np.zeros((1, 32, 32, 3))
    stripes[:, :, ::2] = 1.0  # a vertical line every other column
    shifted = np.roll(stripes, 1, axis=2)  # the same detail, out of phase
    a, b = torch.from_numpy(stripes), torch.from_numpy(shifted)
    assert detail_loss(a, a).item() == 0.0
    # L1 sees every pixel wrong; the detail loss only the border column the roll moved
    assert (a - b).abs().mean().item() == 1.0
    assert detail_loss(a, b, window=3).item() < 0.05 * detail_loss(torch.full_like(a, 0.5), a, window=3).item()
    # a flat render against a detailed target costs the target's detail
    noise = torch.from_numpy(rng.random((1, 16, 16, 3)))
    flat = torch.full_like(noise, 0.5)
    assert detail_loss(flat, noise).item() > 0.1


def test_detail_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    pred = torch.rand(1, 8, 8, 3, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 8, 8, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: detail_loss(p, target, window=3, eps=1e-3), (pred,))


def test_detail_loss_sharpens_a_blurred_render():
    """Descending on the detail loss alone raises a blurred render's Laplacian energy towards
    the target's: it asks for the amount of detail, not for the target's pixels."""
    torch.manual_seed(0)
    target = torch.rand(1, 24, 24, 3, dtype=torch.float64)
    blurred = torch.nn.functional.avg_pool2d(target.permute(0, 3, 1, 2), 3, 1, 1,
                                             count_include_pad=False).permute(0, 2, 3, 1)
    pred = blurred.clone().requires_grad_(True)
    opt = torch.optim.Adam([pred], lr=1e-2)
    e0 = laplacian_energy(pred.detach()).mean().item()
    for _ in range(100):
        opt.zero_grad()
        detail_loss(pred, target, window=5).backward()
        opt.step()
    e1 = laplacian_energy(pred.detach()).mean().item()
    et = laplacian_energy(target).mean().item()
    assert e0 < 0.2 * et
    assert e1 > 0.6 * et


def test_bad_detail_settings_are_refused_before_anything_is_written(tmp_path):
    from gstalk.config import CoarseConfig, FineConfig, check_detail_loss
    from gstalk.errors import UsageError

    for cfg_type in (CoarseConfig, FineConfig):
        for bad, msg in (({"detail_lambda": -0.1}, "detail_lambda"), ({"detail_lambda": float("inf")}, "detail_lambda"),
                         ({"detail_window": 4}, "detail_window"), ({"detail_window": 0}, "detail_window")):
            with pytest.raises(UsageError, match=msg):
                check_detail_loss(cfg_type(**bad))
        check_detail_loss(cfg_type(detail_lambda=0.0, detail_window=1))
        check_detail_loss(cfg_type())
    # the stages check before they open the workspace (this folder is not one)
    from gstalk.stages.coarse import run_coarse
    from gstalk.stages.fine import run_fine

    ws = tmp_path / "ws"
    for run, cfg in ((run_coarse, CoarseConfig(detail_window=4)), (run_fine, FineConfig(detail_window=4))):
        with pytest.raises(UsageError, match="detail_window: 4 is not an odd number"):
            run(str(ws), cfg)
        assert not ws.exists()


def test_the_box_scales_with_the_working_size_and_stays_odd():
    assert [scaled_window(15, s) for s in (1.0, 2.0, 0.5, 4.0)] == [15, 31, 7, 61]
    assert [scaled_window(7, s) for s in (1.5, 0.25)] == [11, 1]
    assert all(scaled_window(w, s) % 2 == 1 for w in (1, 3, 7, 15) for s in (0.3, 0.75, 1.0, 1.7, 2.0, 3.3))
