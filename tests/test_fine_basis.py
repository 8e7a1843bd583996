"""The coarse articulation basis carried into the fine model (gstalk.deform.basis): rendered
at each frame's code, frozen through fine training, carried by densification and bundles,
and the default articulation gain it brings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gstalk.deform.basis import BASIS_KEYS, articulated, check_basis, frame_code, stored_basis


def _scene(n: int = 40, d: int = 3, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Gaussians in front of a camera at the origin, and a random basis [n, d, 3]."""
    g = torch.Generator().manual_seed(seed)
    params = {"means": torch.rand(n, 3, generator=g) * torch.tensor([0.1, 0.1, 0.05]) - torch.tensor([0.05, 0.05, 0.0]),
              "scales": torch.full((n, 3), -4.5), "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
              "opacities": torch.full((n,), 2.0), "sh0": torch.randn(n, 1, 3, generator=g) * 0.5,
              "shN": torch.zeros(n, 0, 3)}
    basis = {"means": torch.randn(n, d, 3, generator=g) * 0.004, "sh0": torch.randn(n, d, 3, generator=g) * 0.2}
    return params, basis


def _model(articulation: int):  # type: ignore[no-untyped-def]
    from gstalk.deform.gstalker import GSTalkerDeformation

    torch.manual_seed(0)
    aabb = torch.tensor([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]])
    return GSTalkerDeformation(aabb, 6, window=4, audio_dim=4, smooth=3, levels=2, max_res=16, log2_table=8,
                               articulation=articulation, articulation_members=1, articulation_smooth=3,
                               code_encoder="mlp").eval()


def _camera() -> tuple[torch.Tensor, torch.Tensor]:
    vm = torch.eye(4)
    vm[2, 3] = 0.4  # the scene 0.4 m in front of the camera
    K = torch.tensor([[120.0, 0, 32], [0, 120.0, 32], [0, 0, 1]])
    return vm, K


def test_the_head_renders_each_frames_code_through_the_carried_basis():
    """TalkingHead with ``basis_*`` among the Gaussians renders exactly the field's deformed
    Gaussians moved by the basis at the middle window's code; at code 0 as without a basis;
    a model driven by the audio itself (no articulator) ignores the basis."""
    from gstalk.deform.base import apply_deltas
    from gstalk.gaussians.splat import splat
    from gstalk.render.head import TalkingHead

    params, basis = _scene()
    model = _model(articulation=3)
    with torch.no_grad():  # a field that moves the Gaussians too, so both terms are checked
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vm, K = _camera()
    carried = {**params, "basis_means": basis["means"], "basis_sh0": basis["sh0"]}
    codes = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-2.0, 1.0, 0.2]])
    windows = model.code_windows(codes)[None]  # [1, K=3, W, D]: the frame is the middle one
    torch.testing.assert_close(frame_code(windows), codes[1])
    with torch.no_grad():
        got = TalkingHead(carried, model, K, 64, 64).render(windows, 0.0, vm)
        deltas = model.deform(model.spatial(params["means"]), model.encode_audio(windows)[0], torch.zeros(1))
        want_params = articulated(apply_deltas(params, deltas), basis, codes[1])
        want, want_a, _ = splat(want_params, vm[None], K, 64, 64)
        plain = TalkingHead(params, model, K, 64, 64).render(windows, 0.0, vm)
    torch.testing.assert_close(got.colors, want, rtol=0, atol=0)
    torch.testing.assert_close(got.alphas, want_a, rtol=0, atol=0)
    assert (got.colors - plain.colors).abs().max() > 0.05  # the basis did move the mouth
    with torch.no_grad():  # at code 0 the basis does nothing
        zero = model.code_windows(torch.zeros(3, 3))[None]
        a = TalkingHead(carried, model, K, 64, 64).render(zero, 0.0, vm)
        b = TalkingHead(params, model, K, 64, 64).render(zero, 0.0, vm)
    torch.testing.assert_close(a.colors, b.colors, rtol=0, atol=0)

    audio_model = _model(articulation=0)
    audio = torch.randn(1, 3, 4, 6)
    with torch.no_grad():
        a = TalkingHead(carried, audio_model, K, 64, 64).render(audio, 0.0, vm)
        b = TalkingHead(params, audio_model, K, 64, 64).render(audio, 0.0, vm)
    torch.testing.assert_close(a.colors, b.colors, rtol=0, atol=0)


def test_the_basis_term_has_the_gradient_of_finite_differences_in_the_code():
    """The rendered image's derivative in the frame's code, through the basis, against
    central finite differences (float64 through the torch rasterizer's path is not needed:
    the basis is linear, so the check is on the Gaussians it hands to the rasterizer)."""
    params, basis = _scene(n=6, d=2)
    p64 = {k: v.double() for k, v in params.items()}
    b64 = {k: v.double() for k, v in basis.items()}
    code = torch.tensor([0.3, -0.8], dtype=torch.float64, requires_grad=True)

    def f(c: torch.Tensor) -> torch.Tensor:
        out = articulated(p64, b64, c)
        return torch.cat([out["means"].reshape(-1), out["sh0"].reshape(-1)])

    assert torch.autograd.gradcheck(f, (code,), eps=1e-6, atol=1e-8)


def test_densification_carries_the_basis_with_its_gaussians_and_it_does_not_train():
    """Clone, split and prune edit ``basis_*`` row for row with the Gaussians (a clone or a
    split child has its parent's basis), and it stays a frozen tensor with no optimizer."""
    from gstalk.config import DensifyConfig
    from gstalk.gaussians.densify import Densifier
    from gstalk.train.coarse import gaussian_optimizers

    params, basis = _scene(n=8, d=3)
    params["scales"][:4] = -6.0  # small (below percent_dense): these clone
    params["scales"][4:] = -1.0  # big: these split
    params["opacities"][7] = -9.0  # transparent: pruned
    tagged = {**params, "basis_means": basis["means"], "basis_sh0": basis["sh0"]}
    pd = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone(), requires_grad=k not in BASIS_KEYS)
                                 for k, v in tagged.items()})
    opts = gaussian_optimizers(pd, {"means": 1e-3, "scales": 1e-3, "quats": 1e-3, "opacities": 1e-2, "sh0": 1e-3,
                                    "shN": 1e-3})
    assert not set(opts) & set(BASIS_KEYS)
    dens = Densifier(DensifyConfig(start=0, stop=100, every=1, reset_opacity_every=0, grad_threshold=1e-4,
                                   percent_dense=0.01, max_gaussians=100), scene_scale=1.0)
    state = dens.initialize_state(8, torch.device("cpu"))
    state["grad2d"][:] = torch.tensor([1.0, 1.0, 0, 0, 1.0, 1.0, 0, 0])  # grow 0, 1 (clone) and 4, 5 (split)
    state["count"][:] = 1
    dens._grow(pd, opts, state, ())
    # kept in order, then the clones, then the split children (2 per parent)
    parents = [0, 1, 2, 3, 6, 7, 0, 1, 4, 5, 4, 5]
    assert pd["means"].shape[0] == len(parents)
    for k in ("means", "sh0"):
        torch.testing.assert_close(pd[f"basis_{k}"].data, basis[k][parents], rtol=0, atol=0)
    torch.testing.assert_close(pd["sh0"].data, params["sh0"][parents], rtol=0, atol=0)
    dens._prune(pd, opts, state, 1, ())
    kept = [p for p in parents if p != 7]
    torch.testing.assert_close(pd["basis_means"].data, basis["means"][kept], rtol=0, atol=0)
    assert not pd["basis_means"].requires_grad and not pd["basis_sh0"].requires_grad


def test_check_basis_names_what_does_not_fit():
    _, basis = _scene(n=5, d=7)
    assert check_basis(basis, 5, 7) is None
    assert "[5, 7, 3]" in check_basis(basis, 5, 6)
    assert "no 'sh0'" in check_basis({"means": basis["means"]}, 5, 7)
    bad = {**basis, "means": basis["means"].clone()}
    bad["means"][0, 0, 0] = math.nan
    assert "NaN" in check_basis(bad, 5, 7)
    assert stored_basis({"means": torch.zeros(1, 3)}) is None


def test_default_gain_follows_the_model():
    from gstalk.config import (
        BASIS_ARTICULATION_GAIN,
        DEFAULT_ARTICULATION_GAIN,
        check_articulation_gain,
        default_articulation_gain,
    )

    params, basis = _scene(n=3)
    assert default_articulation_gain(False) == DEFAULT_ARTICULATION_GAIN == 1.5
    assert default_articulation_gain(True) == BASIS_ARTICULATION_GAIN == 0.85
    assert check_articulation_gain(None, 0.85) == 0.85 and check_articulation_gain(1.3, 0.85) == 1.3


def test_the_eval_report_says_how_the_mouth_is_driven():
    from gstalk.stages.evaluate import basis_note

    assert basis_note({"articulation_gain": 0.85, "articulation_basis": True}) == \
        " (with the coarse articulation basis, articulation gain 0.85)"
    assert basis_note({"articulation_gain": 1.5, "articulation_basis": False}) == \
        " (without the articulation basis, articulation gain 1.5)"
    assert basis_note({"articulation_gain": 1.5}) == " (articulation gain 1.5)"  # metrics from before the key
    assert basis_note({}) == ""


@pytest.mark.slow
def test_fine_stage_carries_the_coarse_basis_frozen_and_says_when_it_cannot(trained_ws, tmp_path, capsys):
    """The fixture's fine model holds the coarse stage's basis unchanged (frozen through
    training and densification), says so in its summary, and renders at its default gain; a bundle carries it. Turned
    off, with audio conditioning, without a coarse basis or with one that does not fit its
    Gaussians, nothing is carried and the summary says why (a warning for the misfit)."""
    from gstalk.avatar import load_avatar
    from gstalk.bundle import export_bundle
    from gstalk.config import BASIS_ARTICULATION_GAIN, get_preset
    from gstalk.progress import Reporter
    from gstalk.render.driver import HeadRenderer
    from gstalk.stages.fine import carried_basis
    from gstalk.tensorio import load_tensors, save_tensors
    from gstalk.workspace import COARSE_BASIS, Workspace

    coarse_basis, _ = load_tensors(trained_ws / COARSE_BASIS)
    model, _ = load_tensors(trained_ws / "fine" / "model.safetensors")
    # the test preset densifies in the fine stage: every Gaussian's basis is, unchanged, the one
    # of the coarse Gaussian it descends from (frozen, and copied by clone and split)
    fine_rows = torch.cat([model["params.basis_means"], model["params.basis_sh0"]], 1).flatten(1)
    coarse_rows = torch.cat([coarse_basis["means"], coarse_basis["sh0"]], 1).flatten(1)
    assert len(fine_rows) == len(model["params.means"]) != len(coarse_rows)
    coarse_set = {tuple(r) for r in coarse_rows.tolist()}
    assert all(tuple(r) in coarse_set for r in fine_rows.tolist())
    assert (fine_rows.abs().amax(1) > 0).sum() >= (coarse_rows.abs().amax(1) > 0).sum() // 2  # not pruned away
    summary = json.loads((trained_ws / "fine" / "summary.json").read_text())
    moved = int((coarse_basis["means"].norm(dim=-1).amax(-1) > 0).sum())
    assert summary["articulation_basis"]["source"] == "coarse" and summary["articulation_basis"]["gaussians"] == moved
    assert HeadRenderer(load_avatar(trained_ws)).articulation_gain == BASIS_ARTICULATION_GAIN
    export_bundle(trained_ws, tmp_path / "a.gstalk")
    bundled = load_avatar(tmp_path / "a.gstalk").params
    torch.testing.assert_close(bundled["basis_means"], model["params.basis_means"], rtol=0, atol=0)

    ws = Workspace.open(trained_ws)
    cfg = get_preset("test").fine
    n = int(coarse_basis["means"].shape[0])
    quiet = Reporter(quiet=True)
    got, info = carried_basis(ws, cfg, n, 7, quiet)
    assert set(got) == set(BASIS_KEYS) and info["source"] == "coarse"
    import dataclasses

    for changes, reason in (({"articulation_basis": "none"}, "articulation_basis=none"),
                            ({"conditioning": "audio"}, "conditioning=audio")):
        got, info = carried_basis(ws, dataclasses.replace(cfg, **changes), n, 7, quiet)
        assert got == {} and info["source"] == "none" and reason in info["reason"]
    # a coarse basis that does not match the coarse Gaussians: refused, with a warning naming the file
    copy = tmp_path / "ws"
    import shutil

    shutil.copytree(trained_ws, copy)
    wc = Workspace.open(copy)
    save_tensors(wc.path(COARSE_BASIS), {k: v[:-1].contiguous() for k, v in coarse_basis.items()}, {})
    got, info = carried_basis(wc, cfg, n, 7, Reporter())
    err = "".join(capsys.readouterr().err.split())  # the console wraps long paths anywhere
    assert got == {} and "articulation_basis.safetensors" in err and f"not[{n},7,3]" in err and "gstalkcoarse" in err
    wc.path(COARSE_BASIS).unlink()
    got, info = carried_basis(wc, cfg, n, 7, quiet)
    assert got == {} and "fitted no articulation basis" in info["reason"]
