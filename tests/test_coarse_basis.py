"""The coarse stage's articulation basis (``articulation_basis``): the linear map it applies,
the lower-face region it may move, and on a synthetic scene whose "lip" moves with the code
while the camera's pitch follows the code too, that the basis recovers the lip's motion and
the static head at code 0 keeps the lip where it is on average."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from gstalk.config import CoarseConfig, DensifyConfig
from gstalk.deform.basis import articulated
from gstalk.gaussians.splat import composite, splat
from gstalk.tracking.canonical import canonical_face
from gstalk.train.coarse import CoarseTrainer, init_basis, lower_face
from gstalk.train.frames import FrameSet


def _params(means: torch.Tensor, rgb: torch.Tensor, log_scale: float = -4.0) -> torch.nn.ParameterDict:
    n = len(means)
    sh0 = (rgb - 0.5) / 0.28209479177387814
    return torch.nn.ParameterDict({
        "means": torch.nn.Parameter(means.clone()), "scales": torch.nn.Parameter(torch.full((n, 3), log_scale)),
        "quats": torch.nn.Parameter(torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1)),
        "opacities": torch.nn.Parameter(torch.full((n,), 4.0)), "sh0": torch.nn.Parameter(sh0[:, None].clone()),
        "shN": torch.nn.Parameter(torch.zeros(n, 0, 3))})


def test_articulated_is_linear_in_the_code_and_identity_at_zero():
    g = torch.Generator().manual_seed(0)
    p = _params(torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g))
    basis = init_basis(5, 7)
    with torch.no_grad():
        for v in basis.values():
            v.copy_(torch.randn(v.shape, generator=g))
    code = torch.randn(7, generator=g)
    zero = articulated(p, basis, torch.zeros(7))
    for k in p:
        torch.testing.assert_close(zero[k], p[k], rtol=0, atol=0)
    one, two = articulated(p, basis, code), articulated(p, basis, 2 * code)
    torch.testing.assert_close(two["means"] - p["means"], 2 * (one["means"] - p["means"]))
    # hand computation for Gaussian 3, coordinate y
    expect = p["means"][3, 1] + sum(code[d] * basis["means"][3, d, 1] for d in range(7))
    torch.testing.assert_close(one["means"][3, 1], expect)
    torch.testing.assert_close(one["sh0"][3, 0, 2], p["sh0"][3, 0, 2] + (code * basis["sh0"][3, :, 2]).sum())
    region = torch.tensor([True, False, True, False, False])
    masked = articulated(p, basis, code, region)
    torch.testing.assert_close(masked["means"][1], p["means"][1], rtol=0, atol=0)
    torch.testing.assert_close(masked["means"][2], one["means"][2])


def test_articulated_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    sh0 = torch.randn(4, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bm = torch.randn(4, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(4, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    code = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)

    def f(means, sh0, bm, bs, code):  # type: ignore[no-untyped-def]
        out = articulated({"means": means, "sh0": sh0}, {"means": bm, "sh0": bs}, code)
        return out["means"].square().sum() + out["sh0"].pow(3).sum()

    assert torch.autograd.gradcheck(f, (means, sh0, bm, bs, code))


def test_lower_face_holds_the_lips_and_chin_not_the_nose_eyes_or_ears():
    v = torch.tensor(canonical_face().vertices, dtype=torch.float32)
    inside = lower_face(v)
    for i in (0, 13, 14, 17, 61, 291, 152):  # lips, their corners, the chin
        assert inside[i], i
    for i in (1, 10, 33, 263, 234, 454):  # nose tip, forehead, eye corners, ears
        assert not inside[i], i


def _lip_scene(n_frames: int = 48, size: int = 64):
    """A grey card at 0.4 m with a dark "lip" bar that moves down 8 mm per unit of code; the
    camera pitches 4° per unit of code (as a speaker who opens while nodding)."""
    xs, ys = np.meshgrid(np.linspace(-0.05, 0.05, 9), np.linspace(-0.05, 0.05, 9))
    card = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], 1)
    lip = np.stack([np.linspace(-0.02, 0.02, 5), np.full(5, -0.01), np.full(5, 0.002)], 1)
    means = torch.tensor(np.concatenate([card, lip]), dtype=torch.float32)
    rgb = torch.cat([torch.full((len(card), 3), 0.7), torch.full((len(lip), 3), 0.1)])
    truth = _params(means, rgb, log_scale=math.log(0.006))
    g = torch.Generator().manual_seed(3)
    code = torch.randn(n_frames, generator=g)
    f = size * 3.0  # 1 cm at 0.4 m: 4.8 px
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    viewmats, images = [], []
    for c in code.tolist():
        a = math.radians(4.0 * c)
        R = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # canonical y up, z to the viewer -> OpenCV
        vm = torch.eye(4)
        vm[:3, :3] = flip @ R
        vm[:3, 3] = torch.tensor([0.0, 0.0, 0.4])
        p = dict(truth.items())
        p["means"] = truth["means"] + torch.cat([torch.zeros(len(card), 3),
                                                 torch.tensor([0.0, -0.008 * c, 0.0]).repeat(len(lip), 1)])
        with torch.no_grad():
            col, alpha, _ = splat(p, vm[None], K, size, size)
            images.append(composite(col, alpha, torch.zeros(1, size, size, 3)).clamp(0, 1)[0])
        viewmats.append(vm)
    imgs = (torch.stack(images) * 255).round().to(torch.uint8)
    n = n_frames
    data = FrameSet(images=imgs, backgrounds=torch.zeros_like(imgs), viewmats=torch.stack(viewmats), K=K,
                    head_masks=torch.zeros(n, size, size, dtype=torch.uint8),
                    mouth_masks=torch.zeros(n, size, size, dtype=torch.uint8), mouth_boxes=torch.zeros(n, 4),
                    blink=torch.zeros(n), audio=None, frame_ids=torch.arange(n),
                    articulation=torch.stack([code] + [torch.zeros(n)] * 6, 1))
    return truth, data, len(card)


def _train(basis: str):  # type: ignore[no-untyped-def]
    truth, data, n_card = _lip_scene()
    # the true colours and places to start from: what is learnt is the lip's motion
    start = _params(truth["means"].detach(), 0.5 + 0.28209479177387814 * truth["sh0"][:, 0].detach(),
                    log_scale=math.log(0.006))
    cfg = dataclasses.replace(CoarseConfig(), iterations=600, articulation_basis=basis, ssim_lambda=0.0,
                              lr_means=1e-3, lr_articulation=1e-3, lr_sh0=1e-2,
                              densify=DensifyConfig(start=10_000, stop=10_000, reset_opacity_every=0))
    trainer = CoarseTrainer(start, data, cfg, scene_scale=0.1, seed=0)
    history = trainer.run()
    return trainer, n_card, float(np.mean([h["loss"] for h in history[-4:]]))


def test_basis_recovers_a_lip_that_moves_with_the_code():
    trainer, n_card, loss = _train("all")
    moved = trainer.basis["means"][n_card:, 0].detach()  # [5, 3]: metres per unit of code
    assert moved[:, 1].mean() == pytest.approx(-0.008, abs=0.0025), moved
    assert moved[:, 1].abs().mean() > 3 * moved[:, [0, 2]].abs().mean()
    # the other code dimensions never vary, so the basis leaves them alone
    assert trainer.basis["means"][:, 1:].abs().max() < 1e-6
    # the static head (code 0) keeps the lip at its average height
    assert trainer.params["means"][n_card:, 1].detach().mean() == pytest.approx(-0.01, abs=0.002)
    # without the basis a static head cannot follow the lip (the nods only shift it by
    # parallax): its loss stays several times higher; and the synthetic scene lies outside
    # the canonical face's lower face, so ``lower_face`` moves nothing there either
    static, _, static_loss = _train("none")
    assert static.basis is None and static_loss > 4 * loss
    _, _, region_loss = _train("lower_face")
    assert region_loss == pytest.approx(static_loss, rel=1e-6)


def test_coarse_stage_writes_the_basis_and_fits_without_it_when_the_tracks_have_no_code(ws_copy, monkeypatch,
                                                                                        capsys):
    from gstalk.config import get_preset
    from gstalk.progress import Reporter
    from gstalk.stages import coarse as coarse_stage
    from gstalk.tensorio import load_tensors

    cfg = get_preset("test").coarse
    path = ws_copy / "coarse" / "articulation_basis.safetensors"
    basis, _ = load_tensors(path)  # the fixture's coarse run wrote it (the default region)
    gaussians, _ = load_tensors(ws_copy / "coarse" / "gaussians.safetensors")
    assert basis["means"].shape == (len(gaussians["means"]), 7, 3) == basis["sh0"].shape
    outside = ~lower_face(gaussians["means"])
    assert outside.any() and basis["means"][outside].abs().max() == 0  # only the lower face moves
    assert basis["means"][~outside].abs().max() > 0
    summary = json.loads((ws_copy / "coarse" / "summary.json").read_text())
    assert summary["articulation_basis"]["region"] == "lower_face"
    assert summary["articulation_basis"]["gaussians"] == int((~outside).sum())

    # the codes the coarse stage loads without audio are the fine stage's (same standardisation)
    from gstalk.dataset import Tracks, build_frameset, split_indices
    from gstalk.workspace import Workspace

    ws = Workspace.open(ws_copy)
    train = split_indices(ws)[0]
    assert build_frameset(ws, train).articulation is None  # only when asked for
    torch.testing.assert_close(build_frameset(ws, train, codes=True).articulation,
                               build_frameset(ws, train, audio_offset=0).articulation, rtol=0, atol=0)

    # tracks without the code: a warning, a fit without the basis, and no stale basis file left
    monkeypatch.setattr(Tracks, "has_articulation", property(lambda self: False))
    coarse_stage.run_coarse(str(ws_copy), cfg, reporter=Reporter(quiet=True))
    err = " ".join(capsys.readouterr().err.split())
    assert "no mouth articulation code" in err and "gstalk track" in err
    assert not path.exists()
    summary = json.loads((ws_copy / "coarse" / "summary.json").read_text())
    assert summary["articulation_basis"] == {"region": "none"}
