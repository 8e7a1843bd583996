"""Stage 4, ``gstalk fine``: train the audio-driven deformation field.

Reads the coarse Gaussians and the audio features; pairs each frame with the audio shifted
by the A/V offset the track stage measured (or ``--av-offset``). Writes ``ws/fine/``:

- ``model.safetensors``: ``params.*`` canonical Gaussians (with ``params.basis_means`` /
  ``params.basis_sh0``, the coarse stage's articulation basis carried as the mouth's linear
  term, :mod:`gstalk.deform.basis`), ``module.*`` the deformation
  model's weights (with the audio → articulation regressor, ``module.articulator.*``,
  and ``module.code_scale``); metadata: the model spec (to rebuild it), SH degree, A/V
  offset, audio feature layout;
- ``point_cloud.ply``: the canonical Gaussians as a 3DGS PLY;
- ``checkpoint.safetensors``: the latest training state (for ``--resume``), removed when the
  stage finishes;
- ``preview.png`` and ``summary.json``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from gstalk.config import FineConfig, to_dict
from gstalk.dataset import build_frameset, load_audio_features, split_indices
from gstalk.deform.articulation import code_range
from gstalk.deform.basis import BASIS_KEYS, check_basis
from gstalk.deform.registry import build_model, model_spec
from gstalk.errors import WorkspaceError
from gstalk.gaussians import save_ply
from gstalk.images import write_preview
from gstalk.progress import SILENT, Reporter
from gstalk.tensorio import load_tensors, save_tensors
from gstalk.train.checkpoint import load_resumable, restore_training, save_checkpoint, warn_if_replacing
from gstalk.train.fine import FineTrainer, render_deformed
from gstalk.train.frames import FrameSet
from gstalk.workspace import (
    COARSE_BASIS,
    COARSE_GAUSSIANS,
    FINE_CHECKPOINT,
    FINE_MODEL,
    FINE_PLY,
    FINE_PREVIEW,
    FINE_SUMMARY,
    Workspace,
    run_stage,
    write_json,
)


def run_fine(workspace: str, cfg: FineConfig, *, resume: bool = False, reporter: Reporter = SILENT) -> Workspace:
    """Run the fine stage (``resume``: continue from ``fine/checkpoint.safetensors``) on
    ``cfg.device`` (:func:`gstalk.device.stage_device`; a checkpoint made on another device
    resumes here).

    Raises:
        WorkspaceError: coarse missing/stale, or ``resume`` without a compatible checkpoint.
        UsageError / DependencyError: a setting that is not one of its choices or cannot work
            (the torso flow's, the detail loss's), or a device or rasterizer that cannot run here
            (before anything is written).
        TrainingError: the loss stayed NaN/Inf.
    """
    from gstalk.config import check_choices, check_detail_loss
    from gstalk.device import stage_device

    t0 = time.perf_counter()
    check_choices(cfg)
    check_torso_flow(cfg)
    check_detail_loss(cfg)
    ws = Workspace.open(workspace)
    ws.require("fine")
    device = stage_device(cfg.device, cfg.raster)
    run_stage(ws, "fine", to_dict(cfg), lambda: _fine(ws, cfg, resume, reporter, device), started=t0, resume=resume)
    return ws


def check_torso_flow(cfg: FineConfig) -> None:
    """Refuse residual-flow settings that cannot work, before anything is written.

    Raises:
        UsageError: ``torso_flow_grid`` is 1 or negative, or ``torso_flow_steps`` negative."""
    from gstalk.errors import UsageError

    if cfg.torso_flow_grid < 0 or cfg.torso_flow_grid == 1:
        raise UsageError(f"--set torso_flow_grid: {cfg.torso_flow_grid} is not a grid size.",
                         hint="use 0 (no residual flow of the torso) or 2 or more nodes per side (default 4)")
    if cfg.torso_flow_steps < 0:
        raise UsageError(f"--set torso_flow_steps: {cfg.torso_flow_steps} is negative.",
                         hint="use 0 or more Adam steps per frame (default 30)")


def fit_torso_flows(trainer: FineTrainer, test: FrameSet | None, cfg: FineConfig,
                    reporter: Reporter) -> dict[str, Any]:
    """Fit every frame's residual torso flow (:func:`gstalk.train.torso_flow.fit_flows`) to the
    finished, frozen torso field: the training frames, then the ``test`` frames (after their
    registration, :func:`register_test_torso`; None: none). Returns {"train": stats, "test":
    stats, "seconds"}; {} without a torso field with flows or with ``torso_flow_steps`` 0."""
    from gstalk.config import pixel_scale
    from gstalk.train.torso_flow import FlowFit, fit_flows, scaled_flow_fit, set_flows

    torso = trainer.model.torso
    if torso is None or getattr(torso, "flow_grid", 0) == 0 or cfg.torso_flow_steps == 0:
        return {}
    t = time.perf_counter()
    sets = [("train", trainer.data)] + ([("test", test)] if test is not None else [])
    settings = scaled_flow_fit(FlowFit(steps=cfg.torso_flow_steps), pixel_scale(trainer.data.width))
    out: dict[str, Any] = {}
    with reporter.task("torso residual flow", sum(len(d) for _, d in sets)) as bar:
        for name, data in sets:
            flows, stats = fit_flows(torso, data, torso.flow_grid, settings, backend=cfg.raster, progress=bar.advance)
            set_flows(torso, data.frame_ids, flows)
            out[name] = stats
    out["seconds"] = time.perf_counter() - t
    tr = out["train"]
    reporter.log(f"  torso residual flow: {tr['mean_px']:.2f} px mean node shift, error outside the head "
                 f"{tr['mse_before']:.5f} → {tr['mse_after']:.5f} on the training frames ({out['seconds']:.0f} s)")
    return out


def carried_basis(ws: Workspace, cfg: FineConfig, n_gaussians: int, code_dim: int,
                   reporter: Reporter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The coarse stage's articulation basis, to carry into the fine model as the frozen
    linear term of the mouth (:mod:`gstalk.deform.basis`): ``({"basis_means", "basis_sh0"}
    [G, D, 3] float32, summary)``, or ``({}, summary)`` when it is not carried: turned off
    (``articulation_basis=none``), audio conditioning, or a coarse stage that fitted none
    (``coarse/articulation_basis.safetensors`` missing or not matching its Gaussians, which
    is said). The summary's ``source`` is ``coarse`` (with the coarse stage's own statistics of
    the basis: ``gaussians`` it moves, ``mean_mm_per_sd``) or ``none`` with a ``reason``."""
    if cfg.articulation_basis == "none":
        return {}, {"source": "none", "reason": "articulation_basis=none"}
    if cfg.conditioning != "articulation" or code_dim == 0:
        return {}, {"source": "none", "reason": "the field is driven by the audio itself (conditioning=audio)"}
    path = ws.path(COARSE_BASIS)
    if not path.exists():
        reporter.log("  no articulation basis from the coarse stage (coarse ran with articulation_basis=none, or "
                     "before it existed): the field learns the mouth's motion alone")
        return {}, {"source": "none", "reason": "the coarse stage fitted no articulation basis"}
    basis, _ = load_tensors(path)
    why = check_basis(basis, n_gaussians, code_dim)
    if why is not None:
        reporter.warn(f"{path}: the coarse articulation basis is not used: {why}. Re-run `gstalk coarse {ws.root}` "
                      f"to refit it.")
        return {}, {"source": "none", "reason": f"{COARSE_BASIS}: {why}"}
    stats = {k: v for k, v in ws.stage("coarse").summary.get("articulation_basis", {}).items() if k != "region"}
    return {"basis_means": basis["means"].float(), "basis_sh0": basis["sh0"].float()}, {"source": "coarse", **stats}


def held_out_frames(ws: Workspace, trainer: FineTrainer, device: torch.device) -> FrameSet | None:
    """The test frames, on ``device``, for placing the finished torso field on them
    (:func:`register_test_torso`, :func:`fit_torso_flows`); None without a torso field with
    per-frame placements or without test frames."""
    torso = trainer.model.torso
    _, test = split_indices(ws)
    if torso is None or getattr(torso, "n_frames", 0) == 0 or not len(test):
        return None
    return build_frameset(ws, test).to(device)


def register_test_torso(trainer: FineTrainer, test: FrameSet | None, cfg: FineConfig,
                        reporter: Reporter) -> list[dict[str, float]]:
    """Register the torso of the ``test`` frames to the finished torso field (``cfg.torso_passes``
    passes, the field frozen: the shift and turn only, as the coarse stage registers their head pose),
    so eval renders each test frame's torso where the frame has it. Returns each pass's
    frames, mean shift in px and mean turn in degrees; [] without a registrable torso or
    test frames (None)."""
    from gstalk.train.pose_refine import torso_warps, warp_torso

    torso = trainer.model.torso
    if torso is None or test is None or cfg.torso_passes <= 0:
        return []
    out = []
    with reporter.task("torso registration (test frames)", cfg.torso_passes * len(test)) as bar:
        for _ in range(cfg.torso_passes):
            warps, valid = torso_warps(torso, test, backend=cfg.raster, turns=getattr(torso, "has_turns", False),
                                       progress=bar.advance)
            warp_torso(torso, test.frame_ids[valid], warps[valid], test.K)
            any_ = bool(valid.any())
            out.append({"frames": float(valid.sum()),
                        "shift_px": float(warps[valid, :2].norm(dim=1).mean()) if any_ else 0.0,
                        "turn_deg": float(warps[valid, 2].abs().mean()) * 180.0 / math.pi if any_ else 0.0})
    return out


def _fine(ws: Workspace, cfg: FineConfig, resume: bool, reporter: Reporter, device: torch.device) -> dict[str, Any]:
    from gstalk.config import CoarseConfig, from_dict
    from gstalk.device import describe

    coarse, cmeta = load_tensors(ws.path(COARSE_GAUSSIANS))
    # the coarse run's own learning rates, as it recorded them (the canonical Gaussians keep training)
    coarse_cfg = from_dict(CoarseConfig, ws.stage("coarse").config)
    av_offset = cfg.av_offset
    if av_offset is None:
        av_offset = int(ws.stage("track").summary.get("av_offset_frames", 0))
    af = load_audio_features(ws)
    train, _ = split_indices(ws)
    reporter.log(f"[bold]fine[/bold] model {cfg.model}, {len(train)} training frames, {cfg.iterations} iterations, "
                 f"A/V offset {av_offset:+d} frames, on {describe(device)}")
    data = build_frameset(ws, train, audio_offset=av_offset)
    aabb = torch.tensor(cmeta["aabb"], dtype=torch.float32)
    if cfg.conditioning == "articulation" and data.articulation is None:
        raise WorkspaceError("The track stage's blendshape names are missing, so the mouth articulation "
                             "code cannot be computed.",
                             hint=f"re-run `gstalk track {ws.root}`, or use --conditioning audio")
    art_dim = 0 if data.articulation is None else int(data.articulation.shape[1])
    prior, prior_note = None, "no articulation prior (conditioning=audio)"
    if cfg.conditioning == "articulation":  # on --resume too: the prior sizes the regressor in the spec
        from gstalk.prior import resolve_prior

        prior, prior_note = resolve_prior(cfg.articulation_prior, af.extractor,
                                          ws.stage("extract").config.get("audio", {}), af.window)
        if prior is None and cfg.articulation_prior == "auto":  # the default could not apply: say so loudly
            reporter.warn(f"{prior_note}. Without it the mouth follows other people's speech far less well "
                          f"(docs/methods.md, \"Audio → mouth on any voice\").")
        else:
            reporter.log(f"  {prior_note}")
    spec = model_spec(cfg.model, aabb, af.steps.shape[1], af.window, cfg, articulation=art_dim,
                      prior=prior.meta if prior is not None else None)
    if cfg.conditioning == "articulation":  # renders keep the code inside what training saw
        spec["code_range"] = code_range(data.articulation[data.frame_ids])
    torso = None
    if cfg.torso:  # GSTalker's pose-conditioned torso, seeded from the training frames' torso masks
        from gstalk.deform.torso import init_torso

        assert data.torso_masks is not None
        # its own seed, so every model starts from the same torso (its training does not see
        # the head), and the models' scores over it compare
        torch.manual_seed(ws.seed)
        n_all = int(ws.stage("extract").summary["n_frames"]) if cfg.torso_passes > 0 else 0
        if cfg.torso_flow_grid > 0 and cfg.torso_passes <= 0:
            reporter.warn("torso_passes=0: the torso gets no per-frame placement, so no residual flow either "
                          "(torso_flow_grid is ignored); use --set torso_passes=2 (the default) for both")
        torso = init_torso(data.images, data.torso_masks, data.viewmats, data.K, float(cmeta["scene_scale"]),
                           stride=cfg.torso_stride, hidden=cfg.torso_hidden, n_frames=n_all,
                           turns=cfg.torso_turns, flow_grid=cfg.torso_flow_grid)
        if torso.n == 0:
            reporter.log("  [yellow]no torso in the masks: the torso field is left out[/yellow]")
            torso = None
        else:
            spec["torso"] = torso.spec()
    torch.manual_seed(ws.seed)
    model = build_model(spec)
    if prior is not None and not resume:  # the regressor starts from the multi-speaker prior
        assert model.articulator is not None
        model.articulator.load_state_dict(prior.ensemble.state_dict())
    if torso is not None:  # the seeded Gaussians and MLP (drawn before, and apart from, the head)
        model.torso.load_state_dict(torso.state_dict())
    ckpt_path = ws.path(FINE_CHECKPOINT)
    model.to(device)
    basis, basis_info = carried_basis(ws, cfg, int(coarse["means"].shape[0]), art_dim, reporter)
    if not resume:
        warn_if_replacing(ckpt_path, reporter)
        start = {**coarse, **basis}
    else:
        groups, meta = load_resumable(ckpt_path, "fine", ws.root, "spec", spec, device)
        start = groups["params"]
        model.load_state_dict(groups["module"])
    # the basis rides with the Gaussians (densification carries it) but does not train
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(device, copy=True), requires_grad=k not in BASIS_KEYS)
                                     for k, v in start.items()})
    trainer = FineTrainer(params, model, data.to(device), cfg, float(cmeta["scene_scale"]), seed=ws.seed,
                          from_prior=prior is not None, coarse=coarse_cfg)
    if resume:
        restore_training(trainer, groups, meta)
        trainer.articulation_fit = meta["info"].get("articulation_fit")
        prior_note = meta["info"].get("prior_note", prior_note)
        reporter.log(f"  resuming at iteration {trainer.step}")

    def checkpoint(t: FineTrainer) -> None:
        save_checkpoint(ckpt_path, step=t.step, params=t.params, module=t.model, optimizers=t.optimizers,
                        densify=t.densify_state or None, rng=t.rng,
                        info={"spec": spec, "articulation_fit": t.articulation_fit, "prior_note": prior_note})

    t = time.perf_counter()
    if trainer.step == 0 and model.articulator is not None:
        members = cfg.articulation_members
        with reporter.task("audio → articulation", members) as abar:
            trainer.articulation_fit = trainer.fit_articulator(lambda k: abar.advance())
        trainer.articulation_fit["seconds"] = time.perf_counter() - t
        t = time.perf_counter()
    first = trainer.step
    with reporter.task("fine", cfg.iterations) as bar:
        bar.advance(trainer.step)

        def cb(step: int, stats: dict[str, float]) -> None:
            bar.advance()
            if step % 10 == 0:
                bar.update(info=f"loss {stats['loss']:.4f}")
        trainer.run(cb, checkpoint)
    test_frames = held_out_frames(ws, trainer, device)
    torso_test = register_test_torso(trainer, test_frames, cfg, reporter)
    torso_flow = fit_torso_flows(trainer, test_frames, cfg, reporter)
    fit = trainer.articulation_fit
    fit_level = None
    if fit is not None:
        from gstalk.deform.articulation import describe_fit

        seen = prior.fitted_on(str(ws.manifest.get("source", {}).get("sha256", ""))) if prior is not None else None
        if seen:
            fit["prior_fitted_on_clip"] = seen
        if prior is not None and cfg.articulation_adapt_steps == 0:  # nothing fitted: every frame held out
            fitted = "which the prior was fitted on" if seen else "none fitted to"
            reporter.log(f"  audio -> articulation: the prior as it is, R² {fit['val_r2']:.2f} over the "
                         f"{int(fit.get('val_frames', 0))} training frames, {fitted} (one of its "
                         f"{int(fit['members'])} regressors alone: {fit['member_val_r2']:.2f}); code scale "
                         f"{fit['code_scale']:.2f}")
        else:
            start = (f"; the prior alone: {fit['start_val_r2']:.2f}" if prior is not None and "start_val_r2" in fit
                     else "")
            held = f"R² {fit['val_r2']:.2f} (not held out: the prior saw these frames)" if seen else \
                f"held-out R² {fit['val_r2']:.2f}"
            reporter.log(f"  audio -> articulation: {held} with {int(fit['members'])} "
                         f"regressors (one alone: {fit['member_val_r2']:.2f}; on the fitted frames "
                         f"{fit['fit_r2']:.2f}{start}); code scale {fit['code_scale']:.2f}")
        fps = float(ws.stage("extract").summary["fps"])
        fit_level, fit_text = describe_fit(float(fit["val_r2"]), len(train) / fps, "articulation prior:" in prior_note,
                                           seen)
        fit["quality"], fit["quality_text"] = fit_level, fit_text
        if fit_level in ("weak", "none"):
            reporter.warn(fit_text)
        else:
            reporter.log(f"  {fit_text}")
    train_s = time.perf_counter() - t
    ms_per_it = 1000 * train_s / max(cfg.iterations - first, 1)  # the steps this process ran
    params_d = {k: v.detach() for k, v in trainer.params.items()}
    meta = {"spec": spec, "av_offset_frames": av_offset, "audio": {"extractor": af.extractor, "window": af.window,
            "steps_per_second": af.steps_per_second, "dim": int(af.steps.shape[1])},
            "scene_scale": float(cmeta["scene_scale"]), "iterations": cfg.iterations}
    tensors = {f"params.{k}": v for k, v in params_d.items()}
    tensors.update({f"module.{k}": v for k, v in model.state_dict().items()})
    save_tensors(ws.path(FINE_MODEL), tensors, meta)
    save_ply(ws.path(FINE_PLY), {k: v.cpu() for k, v in params_d.items()})
    sub = list(range(0, len(data), max(1, len(data) // 4)))[:4]
    renders = render_deformed(params_d, model, trainer.data.subset(sub), backend=cfg.raster)
    write_preview(ws.path(FINE_PREVIEW), data.images[sub].float() / 255.0, renders)
    ckpt_path.unlink(missing_ok=True)
    n_torso = 0 if model.torso is None else int(model.torso.n)
    reporter.log(f"  {int(params_d['means'].shape[0])} Gaussians ({n_torso} torso), {train_s:.0f} s "
                 f"({ms_per_it:.0f} ms/iteration), {trainer.skipped_steps} skipped steps")
    summary = {"model": cfg.model, "iterations": cfg.iterations, "n_gaussians": int(params_d["means"].shape[0]),
               "n_torso_gaussians": n_torso,
               "train_seconds": train_s, "ms_per_iteration": ms_per_it,
               "av_offset_frames": av_offset, "skipped_steps": trainer.skipped_steps,
               "conditioning": cfg.conditioning, "articulation_fit": fit, "articulation_prior": prior_note,
               "torso_registration": {"passes": trainer.torso_history, "test": torso_test},
               "torso_flow": torso_flow, "articulation_basis": basis_info,
               # the range renders clamp the code to (DeformationModel.clamp_codes); None: audio conditioning
               "code_range": spec.get("code_range"),
               "device": str(device), "history": trainer.history[-20:]}
    write_json(ws.path(FINE_SUMMARY), summary)
    return summary
