"""The torso's residual flow (gstalk.deform.torso.warp_layer, gstalk.train.torso_flow)."""

from __future__ import annotations

import math

import pytest
import torch

from gstalk.deform.torso import TorsoField, displace_means, init_torso, render_torso, warp_layer
from gstalk.train.torso_flow import FlowFit, fit_flows, flow_penalty, px_to_grid, set_flows

K96 = torch.tensor([[120.0, 0.0, 48.0], [0.0, 120.0, 48.0], [0.0, 0.0, 1.0]])


def test_no_flow_is_the_identity_and_a_constant_flow_moves_by_whole_pixels():
    g = torch.Generator().manual_seed(0)
    c, a = torch.rand(1, 20, 30, 3, generator=g), torch.rand(1, 20, 30, 1, generator=g)
    c0, a0 = warp_layer(c, a, torch.zeros(1, 2, 4, 4))
    torch.testing.assert_close(c0, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(a0, a, atol=1e-5, rtol=0)
    d = torch.zeros(1, 2, 4, 4)
    d[:, 0], d[:, 1] = 2.0, -1.0  # 2 px right, 1 px up
    c1, a1 = warp_layer(c, a, px_to_grid(d, 30, 20))
    # out(x, y) = in(x - 2, y + 1), away from the replicated borders
    torch.testing.assert_close(c1[0, 2:-2, 3:-3], c[0, 3:-1, 1:-5], atol=1e-5, rtol=0)
    torch.testing.assert_close(a1[0, 2:-2, 3:-3], a[0, 3:-1, 1:-5], atol=1e-5, rtol=0)
    # half a pixel: the two neighbours' average
    d = torch.zeros(1, 2, 4, 4)
    d[:, 0] = 0.5
    half = warp_layer(c, a, px_to_grid(d, 30, 20))[0][0, 2:-2, 3:-3]
    torch.testing.assert_close(half, 0.5 * (c[0, 2:-2, 3:-3] + c[0, 2:-2, 2:-4]), atol=1e-5, rtol=0)


def test_warp_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    c = torch.rand(1, 6, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.rand(1, 6, 7, 1, generator=g, dtype=torch.float64, requires_grad=True)
    # off the pixel lattice: bilinear sampling is smooth between pixels
    f = (0.13 + 0.05 * torch.rand(1, 2, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(warp_layer, (c, a, f), eps=1e-6, atol=1e-5)
    d = torch.rand(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: flow_penalty(d, 0.3, 0.7), (d,), eps=1e-6, atol=1e-6)
    # the penalty against a hand computation: one node moved by (1, 0) on a 2 x 2 grid
    one = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    one[0, 0, 0, 0] = 1.0
    # mean d² = 1/8; neighbour differences: 1 of 4 across, 1 of 4 down
    torch.testing.assert_close(flow_penalty(one, 1.0, 1.0), torch.tensor([1 / 8 + 1 / 4 + 1 / 4], dtype=torch.float64))


def test_displaced_means_against_a_hand_computation_and_finite_differences():
    k = torch.tensor([[100.0, 0.0, 30.0], [0.0, 120.0, 20.0], [0.0, 0.0, 1.0]])
    # one Gaussian at depth 2 m projecting to pixel centre (x, y) = (40.5, 10.5): grid-sample
    # coordinates u = 40 · 2/60 − 1 = 1/3, v = 10 · 2/40 − 1 = −1/2 of a 61 x 41 image
    means = torch.tensor([[(40.5 - 30.0) / 100.0 * 2.0, (10.5 - 20.0) / 120.0 * 2.0, 2.0]])
    # a 2 x 2 grid: the x displacement grows from 0 px on the left to 6 px on the right, the y
    # one is -4 px at the top and 0 at the bottom: at (u, v) = (1/3, -1/2) that is 4 px and -3 px
    flow = px_to_grid(torch.tensor([[[0.0, 6.0], [0.0, 6.0]], [[-4.0, -4.0], [0.0, 0.0]]]), 61, 41)
    moved = displace_means(means, flow, k, 61, 41)
    torch.testing.assert_close(moved - means, torch.tensor([[4.0 * 2.0 / 100.0, -3.0 * 2.0 / 120.0, 0.0]]))
    g = torch.Generator().manual_seed(3)
    m = (torch.rand(5, 3, generator=g, dtype=torch.float64) * 0.2 + torch.tensor([-0.1, -0.1, 1.0],
                                                                                  dtype=torch.float64)).requires_grad_()
    f = (torch.randn(2, 3, 3, generator=g, dtype=torch.float64) * 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, f: displace_means(m, f, k.double(), 61, 41), (m, f), eps=1e-6,
                                    atol=1e-6)


def _textured_torso(n_frames: int, flow_grid: int = 4):  # type: ignore[no-untyped-def]
    from tests.test_torso import _poses, _textured_frames

    imgs, masks = _textured_frames(n_frames)
    vm = _poses(n_frames)
    return imgs, masks, vm, init_torso(imgs, masks, vm, K96, 0.1, stride=1, n_frames=n_frames, turns=True,
                                       flow_grid=flow_grid)


def test_flows_travel_with_the_state_and_move_only_their_frame():
    imgs, masks, vm, t = _textured_torso(3)
    assert t.spec()["flow_grid"] == 4 and t.flows.shape == (3, 2, 4, 4)
    assert t.flow(0) is None  # not fitted: nothing to warp
    d = torch.zeros(1, 2, 4, 4)
    d[:, 1] = -3.0  # frame 1's torso 3 px higher
    set_flows(t, torch.tensor([1]), px_to_grid(d, 96, 96))
    u = TorsoField(**t.spec())
    u.load_state_dict(t.state_dict())
    with torch.no_grad():
        c0, _ = render_torso(u, vm[:1], K96, 96, 96, frame=0)
        c1, _ = render_torso(u, vm[:1], K96, 96, 96, frame=1)
        c1n, _ = render_torso(u, vm[:1], K96, 96, 96, frame=1, flow=False)
    torch.testing.assert_close(c1n, c0)
    torch.testing.assert_close(c1[0, 50:90, 20:76], c0[0, 53:93, 20:76], atol=1e-4, rtol=0)
    # a constant flow moves the flat torso exactly as the same registered offset would
    depth = float(u.means[:, 2].detach().median())
    with torch.no_grad():
        u.offsets[2] = torch.tensor([0.0, -3.0]) * depth / 120.0
        c2, a2 = render_torso(u, vm[:1], K96, 96, 96, frame=2)
        _, a1 = render_torso(u, vm[:1], K96, 96, 96, frame=1)
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=0)
    torch.testing.assert_close(a1, a2, atol=1e-5, rtol=0)
    # a field trained before residual flows has none, and a one-node grid is refused
    old = init_torso(imgs, masks, vm, K96, 0.1, stride=4, n_frames=3, turns=True)
    assert "flow_grid" not in old.spec() and not hasattr(old, "flows") and old.flow(0) is None
    with pytest.raises(ValueError, match="flow_grid"):
        TorsoField(4, n_frames=3, flow_grid=1)


def test_fitting_recovers_a_known_nonrigid_flow_and_leaves_a_matching_frame_alone():
    from gstalk.gaussians.splat import composite
    from tests.test_torso import _torso_frames

    imgs, masks, vm, t = _textured_torso(2)
    # frame 1 shows the field's torso with its top raised 3 px and its bottom in place (the
    # shoulders shrug); frame 0 shows the field's own render
    truth = torch.zeros(1, 2, 4, 4)
    truth[0, 1] = torch.tensor([-3.0, -2.0, -1.0, 0.0])[:, None]
    with torch.no_grad():
        c, a = render_torso(t, vm[:1], K96, 96, 96, frame=0)
        cw, aw = warp_layer(c, a, px_to_grid(truth, 96, 96))
    plate = torch.zeros(1, 96, 96, 3)
    shown = torch.cat([composite(c, a, plate), composite(cw, aw, plate)])
    frames = (shown.clamp(0, 1) * 255).round().to(torch.uint8)
    data = _torso_frames(frames, masks, vm, K96)
    flows, stats = fit_flows(t, data, 4, FlowFit(steps=60), backend="torch")
    assert flows.shape == (2, 2, 4, 4) and stats["frames"] == 2
    px = flows / px_to_grid(torch.ones(2, 1, 1), 96, 96)
    # at the nodes on the torso (the lower half, x 16-80 of 96: rows 2-3, columns 1-2) the
    # fitted flow is the truth within 0.3 px (the outer nodes lie off the torso, where only
    # the smoothness ties them); frame 0 is left where it is (every node under 0.3 px)
    assert (px[1, :, 2:, 1:3] - truth[0, :, 2:, 1:3]).abs().max() < 0.3, px[1]
    assert px[0].abs().max() < 0.3, px[0]
    assert stats["mse_after"] < 0.2 * stats["mse_before"], stats
    # stored, the flows make the renders match the frames
    set_flows(t, data.frame_ids, flows)
    with torch.no_grad():
        c1, a1 = render_torso(t, vm[1:2], K96, 96, 96, frame=1)
    err_fit = (composite(c1, a1, plate) - shown[1:]).abs().mean()
    err_none = (composite(c, a, plate) - shown[1:]).abs().mean()
    assert err_fit < 0.35 * err_none, (float(err_fit), float(err_none))


def test_bad_flow_settings_are_refused_before_training():
    from gstalk.config import FineConfig
    from gstalk.errors import UsageError
    from gstalk.stages.fine import check_torso_flow

    for bad in ({"torso_flow_grid": 1}, {"torso_flow_grid": -2}, {"torso_flow_steps": -1}):
        with pytest.raises(UsageError, match="torso_flow"):
            check_torso_flow(FineConfig(**bad))
    check_torso_flow(FineConfig(torso_flow_grid=0))
    check_torso_flow(FineConfig())


def test_eval_says_what_the_held_out_torso_is_made_of():
    from gstalk.stages.evaluate import torso_provenance

    pasted = torso_provenance(None)
    assert pasted["source"] == "pasted" and "ground truth" in pasted["note"]
    assert torso_provenance(TorsoField(4))["fitted_to_test_frames"] == []  # no registration: the pose alone
    assert torso_provenance(TorsoField(4, n_frames=3, turns=True))["fitted_to_test_frames"] == ["shift", "turn"]
    full = torso_provenance(TorsoField(4, n_frames=3, turns=True, flow_grid=4))
    assert full["fitted_to_test_frames"] == ["shift", "turn", "residual flow"] and "not predicted" in full["note"]


def test_error_split_against_a_hand_computation(benchmark_script):
    mod = benchmark_script("error_split")
    gt = torch.full((1, 16, 16, 3), 0.5)
    pred = gt.clone()
    pred[0, 0, 0] = 0.6  # head pixel: squared error 0.01
    pred[0, 15, 15] = 0.8  # outside pixel: 0.09
    head = torch.zeros(1, 16, 16, dtype=torch.bool)
    head[0, :8, :8] = True
    torso = torch.zeros_like(head)
    torso[0, 8:, :8] = True
    r = mod.split_error(pred, gt, {"head": head, "torso": torso, "outside": ~(head | torso)})
    # mean squared error over the 256 pixels: 0.1 / 256
    assert r["psnr_of_mean_mse"] == pytest.approx(-10 * math.log10(0.1 / 256))
    assert r["head"]["share"] == pytest.approx(0.1) and r["outside"]["share"] == pytest.approx(0.9)
    assert r["torso"]["share"] == 0 and r["outside"]["area"] == pytest.approx(0.5)
    assert r["outside"]["psnr_if_perfect"] == pytest.approx(-10 * math.log10(0.01 / 256))


def test_error_split_denoises_the_truth_for_its_noise_ceiling(benchmark_script):
    """The denoised-truth row: a smooth image plus noise comes back as [F, H, W, 3] float32 in
    [0, 1], closer to the smooth image than the noisy one was; a flat image stays flat, within
    the colour conversion's rounding (OpenCV denoises in CIELAB: 90 comes back as 89)."""
    import numpy as np

    mod = benchmark_script("error_split")
    yy, xx = np.mgrid[0:48, 0:48]
    clean = np.stack([100 + yy, 80 + xx, 120 + (yy + xx) // 2], -1).astype(np.float64)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 3, clean.shape), 0, 255).round().astype(np.uint8)
    out = mod.denoised(torch.from_numpy(np.stack([noisy, np.full_like(noisy, 90)])))
    assert out.shape == (2, 48, 48, 3) and out.dtype == torch.float32
    err_before = np.abs(noisy / 255.0 - clean / 255.0).mean()
    err_after = float((out[0] - torch.from_numpy(clean / 255.0).float()).abs().mean())
    assert err_after < 0.7 * err_before
    assert float(out[1].std()) == 0.0 and abs(float(out[1].mean()) - 90 / 255.0) <= 1.5 / 255.0


def test_error_split_splits_ssim_by_region(benchmark_script):
    """The SSIM map's mean is torchmetrics' SSIM; a region whose pixels lie farther than the
    window's reach (5 px) from every difference scores 1 and holds none of the loss; the
    regions' shares of the loss add up to 1."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    mod = benchmark_script("error_split")
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 32, 32, 3, generator=g)
    pred = gt.clone()
    pred[:, :8, :8] = (pred[:, :8, :8] + 0.2 * torch.randn(2, 8, 8, 3, generator=g)).clamp(0, 1)
    head = torch.zeros(2, 32, 32, dtype=torch.bool)
    head[:, :8, :8] = True
    far = torch.zeros_like(head)
    far[:, 16:, 16:] = True  # 8 px or more from the changed block
    masks = {"head": head, "far": far, "rest": ~(head | far)}
    r = mod.split_error(pred, gt, masks)
    ref = float(structural_similarity_index_measure(pred.permute(0, 3, 1, 2).double(), gt.permute(0, 3, 1, 2).double(),
                                                    data_range=1.0))
    assert r["ssim"] == pytest.approx(ref, abs=1e-6)
    assert r["far"]["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert r["far"]["ssim_loss_share"] == pytest.approx(0.0, abs=1e-9)
    assert r["head"]["ssim"] < 0.9 and r["head"]["ssim_loss_share"] > 0.5
    assert sum(r[k]["ssim_loss_share"] for k in masks) == pytest.approx(1.0)


@pytest.mark.slow
def test_error_split_on_a_trained_workspace(trained_ws, benchmark_script):
    mod = benchmark_script("error_split")
    r = mod.error_split(str(trained_ws))
    assert r["frames"] == 7
    for key in ("model", "coarse_own_background"):
        v = r[key]
        assert sum(v[k]["share"] for k in mod.REGIONS) == pytest.approx(1.0)
        assert sum(v[k]["area"] for k in mod.REGIONS) == pytest.approx(1.0)
        assert all(v[k]["psnr_if_perfect"] >= v["psnr_of_mean_mse"] for k in mod.REGIONS)
        assert sum(v[k]["ssim_loss_share"] for k in mod.REGIONS) == pytest.approx(1.0)
        assert 0.0 < v["ssim"] < 1.0
    # over each frame's own torso and background the coarse head's error is nearly all the head's
    own = r["coarse_own_background"]
    assert own["head"]["share"] > own["torso"]["share"]


def test_a_flow_without_placements_is_said_and_none_is_fitted(ws_copy, capsys):
    """``torso_passes=0`` places no frame, so no flows are fitted: the run says so, and the
    field has no flows to render."""
    import dataclasses

    from gstalk.config import get_preset
    from gstalk.dataset import load_fine_model
    from gstalk.progress import Reporter
    from gstalk.stages.fine import run_fine
    from gstalk.workspace import Workspace

    cfg = dataclasses.replace(get_preset("test").fine, torso_passes=0, iterations=20)
    run_fine(str(ws_copy), cfg, reporter=Reporter())
    err = " ".join(capsys.readouterr().err.split())
    assert "torso_passes=0" in err and "torso_flow_grid is ignored" in err
    _, model, _ = load_fine_model(Workspace.open(ws_copy))
    assert model.torso is not None and model.torso.n_frames == 0 and model.torso.flow(3) is None


def test_flow_settings_scale_with_the_image():
    """At twice the reference size every pixel setting doubles and the prior's weights
    quarter, so a displacement of the same fraction of the image costs the same; the fit
    keeps its resolution (downsampled twice as much). Bad scales are refused."""
    from gstalk.config import REFERENCE_SIZE_PX, pixel_scale
    from gstalk.train.torso_flow import flow_penalty, scaled_flow_fit

    assert pixel_scale(REFERENCE_SIZE_PX) == 1.0 and pixel_scale(512) == 2.0
    base = FlowFit()
    assert scaled_flow_fit(base, 1.0) == base
    big = scaled_flow_fit(base, 2.0)
    assert (big.lr_px, big.max_px, big.downsample) == (2 * base.lr_px, 2 * base.max_px, 2 * base.downsample)
    assert big.steps == base.steps and big.chunk == base.chunk
    d = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow_penalty(2 * d, big.mag, big.smooth), flow_penalty(d, base.mag, base.smooth))
    assert scaled_flow_fit(base, 0.5).downsample == 1
    with pytest.raises(ValueError, match="positive"):
        scaled_flow_fit(base, 0.0)
