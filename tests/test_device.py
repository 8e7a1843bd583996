"""Devices: ``--device`` is resolved and checked before any work, every stage runs with
``device="cpu"`` given explicitly (and gives what the default gives), and nothing is left
behind on the CPU when a model, a frame set, a checkpoint or an avatar goes to another device.

There is no GPU on the machines these tests run on, so "another device" is PyTorch's ``meta``
device: it has shapes but no data, and refuses any operation that mixes it with a CPU
tensor. A forward pass that builds a tensor on the CPU by mistake (``torch.arange(n)``
without ``device=``) fails there exactly as it would on CUDA. The real CUDA runs are in
``tests/test_cuda.py`` (marker ``cuda``, skipped with the reason here).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gstalk.config import FineConfig, with_settings
from gstalk.deform.base import apply_deltas
from gstalk.deform.registry import MODELS, build_model, model_spec
from gstalk.device import check_raster, resolve_device
from gstalk.errors import DependencyError, UsageError

AABB = torch.tensor([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]])
META = torch.device("meta")


def _small(**kw) -> FineConfig:
    return with_settings(FineConfig(), grid_levels=3, grid_log2_table=8, grid_max_res=32, hidden=16, audio_dim=6,
                         plane_res=4, plane_dim=4, feature_dim=8, attention_dim=8, attention_window=4, kan_hidden=8,
                         **kw)


def test_device_is_resolved_and_a_bad_one_refused_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", "cpu") == torch.device("cpu")  # the C++ backend draws on the CPU only
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(DependencyError, match="--device cuda"):
                resolve_device(spec)
    with pytest.raises(UsageError, match="Unknown --device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(UsageError, match="draws on CUDA only"):
        check_raster("gsplat", torch.device("cpu"))
    with pytest.raises(UsageError, match="draws on the CPU only"):
        check_raster("cpu", torch.device("cuda", 0))
    check_raster("torch", torch.device("cuda", 0))  # the reference backend draws anywhere


def test_cli_refuses_a_device_before_touching_the_workspace(tmp_path):
    from typer.testing import CliRunner

    from gstalk.cli import app

    r = CliRunner().invoke(app, ["run", str(tmp_path / "none.mp4"), "--device", "tpu"])
    assert r.exit_code == 2 and "Unknown --device 'tpu'" in r.output
    r = CliRunner().invoke(app, ["run", str(tmp_path / "none.mp4"), "--raster", "gsplat", "--device", "cpu"])
    assert r.exit_code == 2 and "draws on CUDA only" in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("articulation", [0, 7])
def test_every_model_runs_where_it_was_moved(name, articulation):
    """Forward pass, conditions, the declared code shape, the deltas, the model's own losses
    and the torso field on another device: no tensor is made on the CPU on the way."""
    torch.manual_seed(0)
    model = build_model(model_spec(name, AABB, 13, 16, _small(rigid_free=False), articulation=articulation))
    model.to(META)
    means = torch.rand(20, 3, device=META)
    cond = model.conditions(torch.randn(30, 16, 13, device=META))
    windows = cond[torch.arange(model.smooth)][None]
    code = model.encode_audio(windows)
    assert tuple(code.shape[1:]) == model.code_shape
    deltas = model.deform(model.spatial(means), code[0], torch.tensor([0.3], device=META))
    params = {"means": means, "quats": torch.randn(20, 4, device=META), "scales": torch.randn(20, 3, device=META),
              "opacities": torch.randn(20, device=META), "sh0": torch.randn(20, 1, 3, device=META)}
    out = apply_deltas(params, deltas)
    assert all(v.device == META for v in out.values())
    from gstalk.deform.torso import TorsoField

    torso = TorsoField(12).to(META)
    assert all(v.device == META for v in torso(torch.eye(4, device=META)[None]).values())


@pytest.mark.parametrize("name", MODELS)
def test_param_groups_are_the_grids_and_the_rest_in_order(name):
    """The model declares its feature grids; the groups are exactly what the trainer sorted by
    parameter name before (hash tables, dense planes, lines and prototypes at the grid rate),
    in the same order, so training and checkpoints are unchanged."""
    model = build_model(model_spec(name, AABB, 13, 16, _small(), articulation=7))
    from gstalk.deform.torso import TorsoField

    model.torso = TorsoField(5)
    groups = {g["name"]: g["params"] for g in model.param_groups(1e-3, 1e-2)}
    old_grid, old_net = [], []
    for pname, p in model.named_parameters():
        if pname.startswith(("articulator.", "torso.")):
            continue
        is_grid = pname.endswith("table") or any(k in pname for k in (".planes.", ".lines.", ".prototypes."))
        (old_grid if is_grid else old_net).append(p)
    assert [id(p) for p in groups["grid"]] == [id(p) for p in old_grid] and old_grid
    assert [id(p) for p in groups["net"]] == [id(p) for p in old_net]


def test_audioplane_declares_its_mask_loss_and_the_others_none():
    from gstalk.render.head import HeadRender

    cfg = _small()
    ap = build_model(model_spec("audioplane", AABB, 13, 16, cfg))
    d = ap(torch.rand(20, 3) * 0.2 - 0.1, torch.randn(1, ap.smooth, 16, 13), torch.tensor([0.0]))
    assert ap.splat_channels(d, cfg.audioplane).shape == (20, 1)
    off = with_settings(cfg, mask_lambda=0.0)
    assert ap.splat_channels(d, off.audioplane) is None
    mouth = torch.zeros(1, 16, 16, 1)
    mouth[:, 6:10, 6:10] = 1
    grey = torch.full((1, 16, 16, 1), 0.5)
    out = HeadRender(image=None, colors=grey.expand(-1, -1, -1, 3), alphas=grey, code=torch.zeros(1, 6), deltas=d,
                     channels=grey)
    from gstalk.train.losses import dilate_mask, mask_margin_loss

    want = 0.1 * mask_margin_loss(grey, dilate_mask(mouth, round(0.03 * 16)), 0.2)
    assert torch.equal(ap.losses(out, mouth, cfg.audioplane)["mask"], want)
    gs = build_model(model_spec("gstalker", AABB, 13, 16, cfg))
    assert gs.splat_channels(d, cfg.gstalker) is None and gs.losses(out, mouth, cfg.gstalker) == {}


def _frameset(n_all: int = 12, n: int = 4):
    from gstalk.train.frames import FrameSet

    g = torch.Generator().manual_seed(1)
    return FrameSet(
        images=torch.randint(0, 255, (n, 16, 16, 3), dtype=torch.uint8, generator=g),
        backgrounds=torch.randint(0, 255, (n, 16, 16, 3), dtype=torch.uint8, generator=g),
        viewmats=torch.eye(4).expand(n, 4, 4).clone(), K=torch.tensor([[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]]),
        head_masks=torch.zeros(n, 16, 16, dtype=torch.uint8),
        mouth_masks=torch.full((n, 16, 16), 255, dtype=torch.uint8),
        mouth_boxes=torch.zeros(n, 4), blink=torch.zeros(n), audio=torch.randn(n_all, 16, 13, generator=g),
        frame_ids=torch.arange(4, 4 + n), articulation=torch.randn(n_all, 7, generator=g),
        torso_masks=torch.zeros(n, 16, 16, dtype=torch.uint8), plate=torch.zeros(16, 16, 3, dtype=torch.uint8))


def test_a_frame_set_delivers_its_frames_on_its_device():
    data = _frameset()
    assert data.to("cpu") is data
    on = data.to(META)
    assert on.device == META and on.resident
    for t in (on.image(1), on.background(1), on.mouth_mask(1), on.head_mask(1), on.plate_image(), on.viewmats,
              on.K, on.blink, on.audio, on.articulation, on.audio_windows(1, 3)):
        assert t.device == META
    assert on.frame_ids.device.type == "cpu" and int(on.frame_ids[1]) == 5
    sub = on.subset([0, 2])
    assert sub.device == META and sub.images.device == META and sub.frame_ids.tolist() == [4, 6]


def _trainer(data, device: torch.device | str = "cpu"):
    from gstalk.train.fine import FineTrainer

    torch.manual_seed(0)
    model = build_model(model_spec("gstalker", AABB, 13, 16, _small(audio_smooth_window=3), articulation=7))
    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(torch.rand(6, 3) * 0.05 + torch.tensor([0.0, 0.0, 0.5])),
        "scales": torch.nn.Parameter(torch.full((6, 3), -3.0)),
        "quats": torch.nn.Parameter(torch.tensor([[1.0, 0, 0, 0]]).repeat(6, 1)),
        "opacities": torch.nn.Parameter(torch.zeros(6)), "sh0": torch.nn.Parameter(torch.zeros(6, 1, 3)),
        "shN": torch.nn.Parameter(torch.zeros(6, 3, 3))})
    model.to(device)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.detach().to(device)) for k, v in params.items()})
    cfg = with_settings(_small(audio_smooth_window=3), articulation_steps=20, iterations=3, raster="torch",
                        densify_until=3, densify_from=0, densify_every=2, log_every=1)
    return FineTrainer(params, model, data.to(device), cfg, 0.1)


def test_a_checkpoint_made_on_one_device_resumes_on_another(tmp_path):
    """Saved by the CPU training loop, loaded onto another device: parameters, module state,
    Adam's moments and the densification statistics all land there (Adam's step count stays
    a CPU number, as Adam keeps it), with the shapes they were saved with."""
    from gstalk.train.checkpoint import load_checkpoint, restore_training, save_checkpoint

    a = _trainer(_frameset())
    a.run()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, step=a.step, params=a.params, module=a.model, optimizers=a.optimizers,
                    densify=a.densify_state, rng=a.rng)
    groups, meta = load_checkpoint(path, META)
    assert all(v.device == META for g in ("params", "module", "densify") for v in groups[g].values())
    b = _trainer(_frameset(), META)
    b.model.load_state_dict(groups["module"])
    restore_training(b, groups, meta)
    assert b.step == a.step == 3
    for name, opt in b.optimizers.items():
        for pa, pb in zip((p for g in a.optimizers[name].param_groups for p in g["params"]),
                          (p for g in opt.param_groups for p in g["params"])):
            sa, sb = a.optimizers[name].state[pa], opt.state[pb]
            assert sb["exp_avg"].device == META and sb["exp_avg"].shape == sa["exp_avg"].shape
            assert sb["step"].device.type == "cpu" and float(sb["step"]) == float(sa["step"])
    assert all(v.device == META for v in b.densify_state.values())
    # and back: the same checkpoint onto the CPU resumes to the same numbers
    c = _trainer(_frameset())
    groups, meta = load_checkpoint(path, "cpu")
    c.model.load_state_dict(groups["module"])
    restore_training(c, groups, meta)
    for k in a.densify_state:
        torch.testing.assert_close(c.densify_state[k], a.densify_state[k], rtol=0, atol=0)


def test_randomness_is_drawn_on_the_cpu_and_moved():
    from gstalk.device import randn

    torch.manual_seed(5)
    want = torch.randn(3, 4)
    torch.manual_seed(5)
    got = randn(3, 4, device=META)
    assert got.device == META and got.shape == want.shape
    torch.manual_seed(5)
    assert torch.equal(randn(3, 4), want)  # the same numbers on every device


@pytest.mark.slow
def test_every_stage_takes_device_cpu_and_gives_what_the_default_gives(trained_ws, tmp_path):
    """coarse, fine, render, eval and bench render with ``device="cpu"`` passed explicitly:
    each records the device it ran on, and the outputs are those of the default run (the
    fixture's ``auto``, which is the CPU here), bit for bit."""
    from gstalk.config import EvalConfig, RenderConfig, get_preset
    from gstalk.render.bench import bench_render
    from gstalk.stages.coarse import run_coarse
    from gstalk.stages.evaluate import run_eval
    from gstalk.stages.fine import run_fine
    from gstalk.stages.render import run_render
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import COARSE_GAUSSIANS, FINE_MODEL, Workspace

    ws_dir = tmp_path / "ws"
    shutil.copytree(trained_ws, ws_dir)
    p = get_preset("test")
    import dataclasses

    run_coarse(str(ws_dir), dataclasses.replace(p.coarse, device="cpu"))
    run_fine(str(ws_dir), dataclasses.replace(p.fine, device="cpu"))
    ws = Workspace.open(ws_dir)
    assert ws.stage("coarse").summary["device"] == "cpu" and ws.stage("fine").summary["device"] == "cpu"
    assert ws.stage("fine").config["device"] == "cpu"
    for rel in (COARSE_GAUSSIANS, FINE_MODEL):
        got, _ = load_tensors(ws_dir / rel)
        want, _ = load_tensors(trained_ws / rel)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{rel}: {k}"
    r = run_render(ws_dir, None, tmp_path / "cpu.mp4", RenderConfig(device="cpu"))
    default = run_render(ws_dir, None, tmp_path / "default.mp4")
    assert r["device"] == "cpu" and default["device"] == "cpu"
    from gstalk.media import probe, read_video_frames

    def frames(path):  # decoded: the two renders' pixels, whatever the encoder's bytes
        v = probe(path).video
        return np.stack(list(read_video_frames(path, fps=25.0, src_size=(v.width, v.height))))

    assert np.array_equal(frames(tmp_path / "cpu.mp4"), frames(tmp_path / "default.mp4"))
    m = run_eval(ws_dir, EvalConfig(device="cpu"))
    assert m["device"] == "cpu"
    assert Workspace.open(ws_dir).stage("eval").config["device"] == "cpu"
    b = bench_render(ws_dir, frames=3, warmup=1, device="cpu")
    assert b["device"] == "cpu" and b["frames"] == 3


@pytest.mark.slow
def test_a_trained_model_loads_onto_another_device(trained_ws):
    """The fine stage's file, written by the training path, loads into the rendering path
    (an :class:`~gstalk.avatar.Avatar`) on another device: every tensor goes there, and the
    avatar shared by the CPU renders is left where it was."""
    from gstalk.avatar import Avatar
    from gstalk.dataset import load_fine_model
    from gstalk.workspace import Workspace

    ws = Workspace.open(trained_ws)
    params, model, _ = load_fine_model(ws, META)
    assert all(v.device == META for v in params.values())
    assert all(t.device == META for t in [*model.parameters(), *model.buffers()])
    avatar = Avatar.from_workspace(ws)
    moved = avatar.on(META)
    assert moved is avatar.on(META) and avatar.on("cpu") is avatar
    assert all(t.device == META for t in [*moved.params.values(), *moved.model.parameters(), *moved.model.buffers()])
    assert avatar.device.type == "cpu" and all(t.device.type == "cpu" for t in avatar.model.parameters())


def test_render_and_eval_take_a_config_or_its_fields_as_keywords():
    from pathlib import Path

    from gstalk.config import EvalConfig, RenderConfig, with_options

    cfg = with_options(RenderConfig, None, {"backend": "torch", "pose": "still", "device": "cpu"}, "render")
    assert (cfg.raster, cfg.pose, cfg.device) == ("torch", "still", "cpu")  # `backend` is raster's older name
    e = with_options(EvalConfig, EvalConfig(device="cpu"), {"lpips": Path("w.safetensors")}, "eval")
    assert (e.lpips, e.device) == ("w.safetensors", "cpu")
    with pytest.raises(UsageError, match="Unknown render option"):
        with_options(RenderConfig, None, {"colour": "red"}, "render")
    with pytest.raises(UsageError, match="--blink 'sometimes' is not one of video, auto"):
        with_options(RenderConfig, None, {"blink": "sometimes"}, "render")
    with pytest.raises(UsageError, match="--lmd-landmarks 'dlib'"):
        with_options(EvalConfig, None, {"lmd_landmarks": "dlib"}, "eval")


@pytest.mark.slow
def test_gstalk_run_with_device_cpu_records_the_cpu_in_every_stage(mannequin_clip, tmp_path):
    """The whole pipeline, ``gstalk run --device cpu`` as a user types it (through typer's
    runner) on the synthetic clip: every stage that takes a device (coarse, fine, render,
    eval; extract and track run on the CPU only) records ``cpu`` in the manifest, and each
    output exists and parses."""
    import json

    from typer.testing import CliRunner

    from gstalk.cli import app
    from gstalk.media import probe
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import COARSE_GAUSSIANS, FINE_MODEL, Workspace

    ws_dir = tmp_path / "cpu ws"
    r = CliRunner().invoke(app, ["run", str(mannequin_clip.path), "--preset", "test", "-w", str(ws_dir),
                                 "--device", "cpu", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["device"] == "cpu" and out["preset"] == "test"
    ws = Workspace.open(ws_dir)
    for name in ("extract", "track", "coarse", "fine", "eval"):
        assert ws.stage(name).status == "done", name
    for name in ("coarse", "fine", "eval"):
        assert ws.stage(name).config["device"] == "cpu", name
    assert ws.stage("coarse").summary["device"] == "cpu" and ws.stage("fine").summary["device"] == "cpu"
    render = ws.manifest["renders"]["test"]
    assert render["device"] == "cpu" and render["output"] == out["video"]
    assert out["metrics"]["device"] == "cpu"
    for rel in (COARSE_GAUSSIANS, FINE_MODEL):
        tensors, _ = load_tensors(ws_dir / rel)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), rel
    info = probe(out["video"])
    assert info.video.n_frames == render["frames"] > 0
    metrics = json.loads((ws_dir / "eval" / "metrics.json").read_text())
    assert np.isfinite(metrics["psnr"]) and metrics["psnr"] == pytest.approx(out["metrics"]["psnr"])
