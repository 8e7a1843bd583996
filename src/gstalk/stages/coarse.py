"""Stage 3, ``gstalk coarse``: static canonical 3D Gaussians of the head.

Writes ``ws/coarse/``:

- ``gaussians.safetensors``: raw parameters (see :mod:`gstalk.gaussians.model`), metadata
  with the SH degree, the scene scale and the canonical box;
- ``point_cloud.ply``: the same Gaussians as a standard 3DGS PLY;
- ``cameras.safetensors``: every frame's refined camera (``viewmats`` [N, 4, 4] W2C, the
  ``tracked`` ones they started from, ``corrections`` [N, 6]: rotation vector in radians and
  translation in metres, camera axes; ``registered`` [N]; ``K``), which fine, render and eval
  use instead of the tracked ones (:func:`gstalk.dataset.load_cameras`): the training frames
  refined while the Gaussians train, the test frames registered to the finished Gaussians
  (:mod:`gstalk.train.pose_refine`); with ``pose_passes=0`` the tracked cameras;
- ``articulation_basis.safetensors`` (with ``articulation_basis`` other than ``none``, the
  default ``lower_face``): the per-Gaussian linear basis the fit explained the mouth with
  (``means`` and ``sh0``, [N, D, 3] per standard deviation of each code dimension;
  :func:`gstalk.deform.basis.articulated`); the Gaussians written are the head at code 0, the
  clip's average mouth. Nothing downstream needs it; it is there to inspect;
- ``preview.png``: ground truth | render of a few training frames;
- ``summary.json``: iterations, Gaussian count, final loss, train PSNR, seconds, the pose
  refinement's passes.

While it trains, ``checkpoint.safetensors`` (parameters, Adam moments, densification
statistics, RNG states; every ``checkpoint_every`` iterations) lets a killed run continue
with ``resume=True`` (``gstalk coarse --resume``) to exactly the parameters of an
uninterrupted run; it is deleted when the stage finishes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from gstalk.config import CoarseConfig, to_dict
from gstalk.dataset import build_frameset, split_indices
from gstalk.gaussians import head_init_points, init_params, mouth_init_points, save_ply
from gstalk.gaussians.model import params_to
from gstalk.images import write_preview
from gstalk.progress import SILENT, Reporter
from gstalk.tensorio import save_tensors
from gstalk.tracking.canonical import canonical_face
from gstalk.train.checkpoint import load_resumable, restore_training, save_checkpoint, warn_if_replacing
from gstalk.train.coarse import CoarseTrainer, render_frames
from gstalk.train.frames import FrameSet
from gstalk.workspace import (
    COARSE_BASIS,
    COARSE_CAMERAS,
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


def final_cameras(ws: Workspace, trainer: CoarseTrainer, test: range, cfg: CoarseConfig, device: torch.device,
                  reporter: Reporter) -> dict[str, Any]:
    """Register the test frames to the finished Gaussians (``cfg.pose_passes`` passes, the
    Gaussians frozen: the pose only, as tracking does) and write every frame's camera to
    ``coarse/cameras.safetensors``. Returns the summary of the refinement: the training
    passes, the test passes, the mean corrections and the pose jitter before and after."""
    from gstalk.dataset import load_cameras
    from gstalk.tracking.pose import jitter
    from gstalk.train.coarse import correction_stats
    from gstalk.train.pose_refine import corrected_viewmats, registration_pass

    tracked_all = load_cameras(ws, "tracked")
    n_all = int(tracked_all.viewmats.shape[0])
    prior = trainer.pose_prior
    corrections = torch.zeros(n_all, 6)
    registered = torch.zeros(n_all, dtype=torch.bool)
    train_ids = trainer.data.frame_ids
    corrections[train_ids] = trainer.corrections
    test_passes: list[dict[str, float]] = []
    if cfg.pose_passes > 0 and len(test):
        registered[train_ids] = trainer.registered
        tdata = build_frameset(ws, test, cameras="tracked").to(device)
        params = {k: v.detach() for k, v in trainer.params.items()}
        tc = torch.zeros(len(test), 6)
        ok = torch.zeros(len(test), dtype=torch.bool)
        with reporter.task("pose refinement (test frames)", cfg.pose_passes * len(test)) as bar:
            for _ in range(cfg.pose_passes):
                res = registration_pass(params, tdata, tdata.viewmats, tc, prior, backend=cfg.raster,
                                        sh_degree=trainer.sh_degree(), progress=bar.advance)
                tc, ok = res.corrections, ok | res.registered
                test_passes.append({**correction_stats(tc, prior), "registered": float(res.registered.sum()),
                                    "failed": float(res.failed), "rejected": float(res.rejected)})
        corrections[list(test)] = tc
        registered[list(test)] = ok
    viewmats = corrected_viewmats(tracked_all.viewmats, corrections, prior)
    physical = corrections * prior.sigma()
    save_tensors(ws.path(COARSE_CAMERAS),
                 {"viewmats": viewmats.contiguous(), "tracked": tracked_all.viewmats.contiguous(),
                  "corrections": physical.contiguous(), "registered": registered.to(torch.uint8),
                  "K": tracked_all.K.contiguous()},
                 {"method": "registration" if cfg.pose_passes else "none", "passes": cfg.pose_passes,
                  "prior": {"sigma_rot_deg": prior.sigma_rot_deg, "sigma_trans_mm": list(prior.sigma_trans_mm),
                            "noise_px": prior.noise_px},
                  "units": {"viewmats": "m", "corrections": "rad (rotation vector), m (translation)", "K": "px"}})
    jr, jt = jitter(tracked_all.viewmats[list(train_ids)].double().numpy())
    js, jts = jitter(viewmats[list(train_ids)].double().numpy())
    out = {"passes": trainer.pose_history, "test_passes": test_passes,
           "train": correction_stats(trainer.corrections, prior),
           "test": correction_stats(corrections[list(test)], prior) if len(test) else {},
           "jitter_rot_deg_tracked": jr, "jitter_rot_deg_refined": js,
           "jitter_trans_mm_tracked": jt, "jitter_trans_mm_refined": jts}
    if cfg.pose_passes:
        reporter.log(f"  pose refinement: training frames corrected by {out['train']['rot_deg']:.2f}° and "
                     f"{out['train']['trans_mm']:.1f} mm on average (depth {out['train']['depth_mm']:.1f} mm), test "
                     f"frames by {out['test'].get('rot_deg', 0.0):.2f}° and {out['test'].get('trans_mm', 0.0):.1f} mm")
    return out


# settings that may change between a stopped run and its resumption
_RESUMABLE_CHANGES = ("iterations", "log_every", "raster", "device", "checkpoint_every")


def run_coarse(workspace: str, cfg: CoarseConfig, *, resume: bool = False, reporter: Reporter = SILENT) -> Workspace:
    """Run the coarse stage (``resume``: continue from ``coarse/checkpoint.safetensors``) on
    ``cfg.device`` (:func:`gstalk.device.stage_device`; a checkpoint made on another device
    resumes here).

    Raises:
        WorkspaceError: extract/track missing or stale, or ``resume`` without a checkpoint
            made with the same settings.
        UsageError / DependencyError: a detail-loss setting that cannot work, or a device or
            rasterizer that cannot run here (before anything is written).
        TrainingError: the loss became NaN/Inf.
    """
    from gstalk.config import check_detail_loss
    from gstalk.device import stage_device

    t0 = time.perf_counter()
    check_detail_loss(cfg)
    ws = Workspace.open(workspace)
    ws.require("coarse")
    device = stage_device(cfg.device, cfg.raster)
    run_stage(ws, "coarse", to_dict(cfg), lambda: _coarse(ws, cfg, reporter, resume, device), started=t0)
    return ws


def _coarse(ws: Workspace, cfg: CoarseConfig, reporter: Reporter, resume: bool,
            device: torch.device) -> dict[str, Any]:
    from gstalk.device import describe

    train, test = split_indices(ws)
    torch.manual_seed(ws.seed)
    reporter.log(f"[bold]coarse[/bold] {len(train)} training frames, {cfg.iterations} iterations on "
                 f"{describe(device)}" + (f", {cfg.pose_passes} pose refinement passes" if cfg.pose_passes else ""))
    data = build_frameset(ws, train, cameras="tracked", codes=cfg.articulation_basis != "none")
    if cfg.articulation_basis != "none" and data.articulation is None:
        reporter.warn("the tracks have no mouth articulation code (no blendshape names): the coarse head is "
                      "fitted without its articulation basis, so mouth shapes that come with a head pose "
                      "stay in the static head; run `gstalk track` again to get the code")
        cfg = dataclasses.replace(cfg, articulation_basis="none")
    box = head_box()
    scene_scale = float((box[1] - box[0]).norm() / 2)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES}
    ckpt_path = ws.path(COARSE_CHECKPOINT)
    if resume:
        groups, meta = load_resumable(ckpt_path, "coarse", ws.root, "settings", settings, device)
        params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in groups["params"].items()})
    else:
        warn_if_replacing(ckpt_path, reporter)
        verts = canonical_face().vertices
        pts = np.concatenate([head_init_points(verts, cfg.n_random, seed=ws.seed),
                              mouth_init_points(verts, cfg.n_mouth, seed=ws.seed + 1)])
        rgb = sample_colors(pts, data, 0)
        params = init_params(torch.from_numpy(pts), torch.from_numpy(rgb), cfg.sh_degree, seed=ws.seed)
        params = params_to(params, device)
    trainer = CoarseTrainer(params, data.to(device), cfg, scene_scale, seed=ws.seed)
    if resume:
        restore_training(trainer, groups, meta)
        trainer.history = list(meta["info"].get("history", []))
        trainer.pose_history = list(meta["info"].get("pose_history", []))
        if "corrections" in groups.get("extra", {}):
            trainer.set_corrections(groups["extra"]["corrections"])
            trainer.registered = groups["extra"]["registered"].bool().cpu()
        trainer.restore_basis(groups.get("extra", {}), groups["optim"])
        reporter.log(f"  resuming at iteration {trainer.step}")

    def checkpoint(tr: CoarseTrainer) -> None:
        save_checkpoint(ckpt_path, step=tr.step, params=tr.params, optimizers=tr.checkpoint_optimizers(),
                        densify=tr.densify_state, rng=tr.rng, extra=tr.checkpoint_extra(),
                        info={"settings": settings, "history": tr.history[-20:], "pose_history": tr.pose_history})

    t, first = time.perf_counter(), trainer.step
    pose_s = 0.0
    with reporter.task("coarse", cfg.iterations) as bar:
        bar.advance(trainer.step)

        def cb(step: int, stats: dict[str, float]) -> None:
            bar.advance()
            if step % 10 == 0:
                bar.update(info=f"loss {stats['loss']:.4f}  {int(stats['n'])} Gaussians")

        pass_started = [0.0]

        def pose_cb(done: int, total: int) -> None:
            nonlocal pose_s
            if done == 1:
                pass_started[0] = time.perf_counter()
            bar.update(info=f"pose refinement {done}/{total} frames")
            if done == total:
                pose_s += time.perf_counter() - pass_started[0]
        trainer.run(cb, checkpoint, pose_cb)
    train_s = time.perf_counter() - t
    ms_per_it = 1000 * train_s / max(cfg.iterations - first, 1)  # the steps this process ran
    params = trainer.params
    ws.path("coarse").mkdir(parents=True, exist_ok=True)
    meta = {"sh_degree": cfg.sh_degree, "scene_scale": scene_scale, "aabb": box.tolist(), "iterations": cfg.iterations}
    save_tensors(ws.path(COARSE_GAUSSIANS), dict(params.items()), meta)
    cpu_params = {k: v.detach().cpu() for k, v in params.items()}
    save_ply(ws.path(COARSE_PLY), cpu_params)
    if trainer.basis is None:
        ws.path(COARSE_BASIS).unlink(missing_ok=True)  # not a stale one from an earlier run
    else:
        save_tensors(ws.path(COARSE_BASIS), trainer.basis_tensors(),
                     {"region": cfg.articulation_basis, "units": {"means": "m per standard deviation of the code",
                                                                  "sh0": "SH DC per standard deviation of the code"}})
    t_test = time.perf_counter()  # the test frames' cameras, against the Gaussians just written
    cameras = final_cameras(ws, trainer, test, cfg, device, reporter)
    pose_s += time.perf_counter() - t_test
    # quality on the training frames (a subsample) and a preview
    sub = list(range(0, len(data), max(1, len(data) // 20)))
    renders = render_frames(dict(params.items()), trainer.data.subset(sub), cfg.raster)
    gt = data.images[sub].float() / 255.0
    mse = ((renders - gt) ** 2).mean(dim=(1, 2, 3))
    psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())
    write_preview(ws.path(COARSE_PREVIEW), gt[:4], renders[:4])
    n = int(params["means"].shape[0])
    reporter.log(f"  {n} Gaussians, train PSNR {psnr:.2f} dB, {train_s:.0f} s "
                 f"({ms_per_it:.0f} ms/iteration, of which {pose_s:.0f} s pose refinement)")
    summary = {"iterations": cfg.iterations, "n_gaussians": n, "train_psnr": psnr, "train_seconds": train_s,
               "ms_per_iteration": ms_per_it, "scene_scale": scene_scale, "device": str(device),
               "pose_refinement": {**cameras, "seconds": pose_s},
               "articulation_basis": trainer.basis_summary(),
               "history": trainer.history[-20:]}
    write_json(ws.path(COARSE_SUMMARY), summary)
    ckpt_path.unlink(missing_ok=True)
    return summary

