"""The CUDA path at test size (marker ``cuda``): what ``benchmarks/gpu_check.sh`` runs first on a
machine with an NVIDIA GPU. Skipped, with the reason, where torch sees no GPU
(``tests/conftest.py``).

- every stage on the GPU (``device="cuda"``, gsplat when installed, else the torch reference
  backend) through ``gstalk run``'s sequence on the synthetic clip;
- a workspace trained on the CPU renders on the GPU, and one trained on the GPU renders on
  the CPU, to nearly the same frames;
- a fine run stopped on the CPU resumes on the GPU (the checkpoint's moments go to the GPU);
- the renderer's frames on the GPU match those on the CPU.

Tolerances: the GPU and the CPU sum in other orders (and gsplat clamps alpha at 0.999, not
0.99, ``docs/raster.md``), so frames agree to a few 1/255 where the head is, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def _raster() -> str:
    from gstalk.raster.backends import get_backend

    return "gsplat" if get_backend("gsplat").unavailable_reason(torch.device("cuda", 0)) is None else "torch"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def test_every_stage_runs_on_the_gpu(mannequin_clip, tmp_path):
    from gstalk.pipeline import run_all
    from gstalk.workspace import Workspace

    r = run_all(mannequin_clip.path, tmp_path / "ws", preset="test", device="cuda", raster=_raster())
    assert r["device"] == "cuda:0"
    ws = Workspace.open(r["workspace"])
    for stage in ("coarse", "fine"):
        assert ws.stage(stage).summary["device"] == "cuda:0"
    m = r["metrics"]
    assert m["device"] == "cuda:0" and np.isfinite(m["psnr"]) and m["psnr"] > m["baselines"]["mean_frame"]["psnr"]
    assert ws.is_current("eval")


def _frames(avatar, device: str, n: int = 6) -> np.ndarray:
    from gstalk.render.driver import HeadRenderer

    r = HeadRenderer(avatar, device=device, backend="auto" if device == "cpu" else _raster())
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((n, avatar.audio.window, int(avatar.audio.metadata["dim"]))).astype(np.float32)
    return np.stack(list(r.frames(windows, list(range(n)))))


def test_a_cpu_trained_workspace_renders_on_the_gpu_like_on_the_cpu(trained_ws):
    from gstalk.avatar import load_avatar

    avatar = load_avatar(trained_ws)
    cpu, gpu = _frames(avatar, "cpu"), _frames(avatar, "cuda")
    assert cpu.shape == gpu.shape and _psnr(cpu, gpu) > 40.0
    assert avatar.device.type == "cpu"  # the avatar itself stays where it was loaded


def test_a_gpu_trained_workspace_renders_on_the_cpu(trained_ws, tmp_path):
    from gstalk.avatar import load_avatar
    from gstalk.config import get_preset
    from gstalk.stages.fine import run_fine

    ws_dir = tmp_path / "ws"
    shutil.copytree(trained_ws, ws_dir)
    run_fine(str(ws_dir), dataclasses.replace(get_preset("test").fine, device="cuda", raster=_raster()))
    avatar = load_avatar(ws_dir)  # the file holds CPU tensors whatever device trained it
    assert avatar.device.type == "cpu"
    cpu, gpu = _frames(avatar, "cpu"), _frames(avatar, "cuda")
    assert _psnr(cpu, gpu) > 40.0


def test_a_fine_run_stopped_on_the_cpu_resumes_on_the_gpu(trained_ws, tmp_path, monkeypatch):
    from trainer_kill import interrupt_at

    from gstalk.config import get_preset
    from gstalk.stages.fine import run_fine
    from gstalk.train import fine as fine_loop
    from gstalk.workspace import FINE_CHECKPOINT, Workspace

    ws_dir = tmp_path / "ws"
    shutil.copytree(trained_ws, ws_dir)
    cfg = dataclasses.replace(get_preset("test").fine, iterations=30, checkpoint_every=10, device="cpu")
    interrupt_at(monkeypatch, fine_loop.FineTrainer, 15, lambda: run_fine(str(ws_dir), cfg))
    assert (ws_dir / FINE_CHECKPOINT).exists()
    run_fine(str(ws_dir), dataclasses.replace(cfg, device="cuda", raster=_raster()), resume=True)
    s = Workspace.open(ws_dir).stage("fine").summary
    assert s["device"] == "cuda:0" and s["skipped_steps"] == 0


def test_the_torch_backend_draws_on_the_gpu_as_on_the_cpu():
    from conftest_raster import random_scene

    from gstalk.raster import rasterize

    scene = random_scene(200, seed=3)
    c_cpu, a_cpu, _ = rasterize(**scene, backend="torch")
    gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}
    c_gpu, a_gpu, _ = rasterize(**gpu, backend="torch")
    torch.testing.assert_close(c_gpu.cpu(), c_cpu, atol=1e-4, rtol=1e-4)  # float32 sums in another order
    torch.testing.assert_close(a_gpu.cpu(), a_cpu, atol=1e-4, rtol=1e-4)
