"""Stage 3, ``gstalk coarse``: static canonical 3D Gaussians of the head.

Writes ``ws/coarse/``:

- ``gaussians.safetensors``: raw parameters (see :mod:`gstalk.gaussians.model`), metadata
  with the SH degree, the scene scale and the canonical box;
- ``point_cloud.ply``: the same Gaussians as a standard 3DGS PLY;
- ``preview.png``: ground truth | render of a few training frames;
- ``summary.json``: iterations, Gaussian count, final loss, train PSNR, seconds.

While it trains, ``checkpoint.safetensors`` (parameters, Adam moments, densification
statistics, RNG states; every ``checkpoint_every`` iterations) lets a killed run continue
with ``resume=True`` (``gstalk coarse --resume``) to exactly the parameters of an
uninterrupted run; it is deleted when the stage finishes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from gstalk.config import CoarseConfig, to_dict
from gstalk.dataset import build_frameset, split_indices
from gstalk.gaussians import head_init_points, init_params, save_ply
from gstalk.gaussians.model import params_to
from gstalk.images import write_preview
from gstalk.progress import SILENT, Reporter
from gstalk.tensorio import save_tensors
from gstalk.tracking.canonical import canonical_face
from gstalk.train.checkpoint import load_resumable, restore_training, save_checkpoint, warn_if_replacing
from gstalk.train.coarse import CoarseTrainer, render_frames
from gstalk.train.frames import FrameSet
from gstalk.workspace import (
    COARSE_CHECKPOINT,
    COARSE_GAUSSIANS,
    COARSE_PLY,
    COARSE_PREVIEW,
    COARSE_SUMMARY,
    Workspace,
    run_stage,
    write_json,
)


def head_box(margin: float = 0.04) -> torch.Tensor:
    """[2, 3] canonical box (metres) around the face mesh plus ``margin`` and the skull behind."""
    v = canonical_face().vertices
    lo, hi = v.min(0) - margin, v.max(0) + margin
    lo[2] = v[:, 2].min() - (v[:, 2].max() - v[:, 2].min()) * 1.2
    hi[1] += 0.04  # hair
    return torch.tensor(np.stack([lo, hi]), dtype=torch.float32)


def sample_colors(points: np.ndarray, data: FrameSet, frame: int = 0) -> np.ndarray:
    """Colours of canonical points from one training frame (projected with its camera): [P, 3] in [0, 1]."""
    vm = data.viewmats[frame].numpy().astype(np.float64)
    K = data.K.numpy().astype(np.float64)
    pc = points @ vm[:3, :3].T + vm[:3, 3]
    uv = pc[:, :2] / pc[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
    x = np.clip(uv[:, 0].astype(int), 0, data.width - 1)
    y = np.clip(uv[:, 1].astype(int), 0, data.height - 1)
    return data.images[frame].numpy()[y, x].astype(np.float32) / 255.0


# settings that may change between a stopped run and its resumption
_RESUMABLE_CHANGES = ("iterations", "log_every", "raster", "device", "checkpoint_every")


def run_coarse(workspace: str, cfg: CoarseConfig, *, resume: bool = False, reporter: Reporter = SILENT) -> Workspace:
    """Run the coarse stage (``resume``: continue from ``coarse/checkpoint.safetensors``) on
    ``cfg.device`` (:func:`gstalk.device.stage_device`; a checkpoint made on another device
    resumes here).

    Raises:
        WorkspaceError: extract/track missing or stale, or ``resume`` without a checkpoint
            made with the same settings.
        UsageError / DependencyError: a device or rasterizer that cannot run here (before
            anything is written).
        TrainingError: the loss became NaN/Inf.
    """
    from gstalk.device import stage_device

    t0 = time.perf_counter()
    ws = Workspace.open(workspace)
    ws.require("coarse")
    device = stage_device(cfg.device, cfg.raster)
    run_stage(ws, "coarse", to_dict(cfg), lambda: _coarse(ws, cfg, reporter, resume, device), started=t0)
    return ws


def _coarse(ws: Workspace, cfg: CoarseConfig, reporter: Reporter, resume: bool,
            device: torch.device) -> dict[str, Any]:
    from gstalk.device import describe

    train, _ = split_indices(ws)
    torch.manual_seed(ws.seed)
    reporter.log(f"[bold]coarse[/bold] {len(train)} training frames, {cfg.iterations} iterations on "
                 f"{describe(device)}")
    data = build_frameset(ws, train)
    box = head_box()
    scene_scale = float((box[1] - box[0]).norm() / 2)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES}
    ckpt_path = ws.path(COARSE_CHECKPOINT)
    if resume:
        groups, meta = load_resumable(ckpt_path, "coarse", ws.root, "settings", settings, device)
        params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in groups["params"].items()})
    else:
        warn_if_replacing(ckpt_path, reporter)
        pts = head_init_points(canonical_face().vertices, cfg.n_random, seed=ws.seed)
        rgb = sample_colors(pts, data, 0)
        params = init_params(torch.from_numpy(pts), torch.from_numpy(rgb), cfg.sh_degree, seed=ws.seed)
        params = params_to(params, device)
    trainer = CoarseTrainer(params, data.to(device), cfg, scene_scale, seed=ws.seed)
    if resume:
        restore_training(trainer, groups, meta)
        trainer.history = list(meta["info"].get("history", []))
        reporter.log(f"  resuming at iteration {trainer.step}")

    def checkpoint(tr: CoarseTrainer) -> None:
        save_checkpoint(ckpt_path, step=tr.step, params=tr.params, optimizers=tr.optimizers,
                        densify=tr.densify_state, rng=tr.rng,
                        info={"settings": settings, "history": tr.history[-20:]})

    t, first = time.perf_counter(), trainer.step
    with reporter.task("coarse", cfg.iterations) as bar:
        bar.advance(trainer.step)

        def cb(step: int, stats: dict[str, float]) -> None:
            bar.advance()
            if step % 10 == 0:
                bar.update(info=f"loss {stats['loss']:.4f}  {int(stats['n'])} Gaussians")
        trainer.run(cb, checkpoint)
    train_s = time.perf_counter() - t
    ms_per_it = 1000 * train_s / max(cfg.iterations - first, 1)  # the steps this process ran
    params = trainer.params
    ws.path("coarse").mkdir(parents=True, exist_ok=True)
    meta = {"sh_degree": cfg.sh_degree, "scene_scale": scene_scale, "aabb": box.tolist(), "iterations": cfg.iterations}
    save_tensors(ws.path(COARSE_GAUSSIANS), dict(params.items()), meta)
    cpu_params = {k: v.detach().cpu() for k, v in params.items()}
    save_ply(ws.path(COARSE_PLY), cpu_params)
    # quality on the training frames (a subsample) and a preview
    sub = list(range(0, len(data), max(1, len(data) // 20)))
    renders = render_frames(dict(params.items()), trainer.data.subset(sub), cfg.raster)
    gt = data.images[sub].float() / 255.0
    mse = ((renders - gt) ** 2).mean(dim=(1, 2, 3))
    psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())
    write_preview(ws.path(COARSE_PREVIEW), gt[:4], renders[:4])
    n = int(params["means"].shape[0])
    reporter.log(f"  {n} Gaussians, train PSNR {psnr:.2f} dB, {train_s:.0f} s "
                 f"({ms_per_it:.0f} ms/iteration)")
    summary = {"iterations": cfg.iterations, "n_gaussians": n, "train_psnr": psnr, "train_seconds": train_s,
               "ms_per_iteration": ms_per_it, "scene_scale": scene_scale, "device": str(device),
               "history": trainer.history[-20:]}
    write_json(ws.path(COARSE_SUMMARY), summary)
    ckpt_path.unlink(missing_ok=True)
    return summary

