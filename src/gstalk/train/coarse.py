"""The coarse stage's loop: static canonical Gaussians fitted to all training frames.

Each step draws one training frame, renders the Gaussians with that frame's camera
(= inverse head pose), composites them over the frame's background (torso over the
plate) and minimises (1 - λ) L1 + λ D-SSIM (3DGS Eq. 7), with adaptive density control
(:class:`~gstalk.gaussians.Densifier`). With ``pose_passes`` > 0 the cameras are refined
too: after the steps of :func:`~gstalk.train.pose_refine.schedule` a registration pass
(:func:`~gstalk.train.pose_refine.registration_pass`) corrects every training frame's
camera against the current Gaussians, and training goes on with the corrected cameras.
With ``articulation_basis`` (default ``lower_face``) each frame is rendered with its tracked
mouth code applied through a per-Gaussian linear basis fitted alongside (:func:`gstalk.deform.basis.articulated`),
so a mouth that opens as the head nods is explained by the code, not by the view; the static
head is the one at code 0.
Pure: tensors in, tensors out, progress through a callback; files are the stage's business.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from gstalk.config import CoarseConfig, pixel_scale
from gstalk.deform.basis import articulated
from gstalk.errors import TrainingError
from gstalk.gaussians import Densifier
from gstalk.gaussians.splat import composite, splat
from gstalk.tracking.canonical import canonical_face
from gstalk.train.frames import FrameSet
from gstalk.train.losses import detail_loss, photometric_loss, scaled_window
from gstalk.train.pose_refine import PosePrior, corrected_viewmats, registration_pass, schedule

Callback = Callable[[int, dict[str, float]], None]


def gaussian_optimizers(params: torch.nn.ParameterDict, lrs: dict[str, float]) -> dict[str, torch.optim.Optimizer]:
    """One Adam per Gaussian parameter (so densification can edit each), 3DGS's eps 1e-15."""
    return {k: torch.optim.Adam([params[k]], lr=lrs[k], eps=1e-15) for k in params.keys() if lrs.get(k, 0) > 0}


def exp_decay(step: int, total: int, start: float, end: float) -> float:
    """Log-linear interpolation from ``start`` (step 0) to ``end`` (step ``total``)."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return math.exp(math.log(start) * (1 - t) + math.log(end) * t)


@dataclass
class CoarseTrainer:
    """State of a coarse run; :meth:`run` trains to ``cfg.iterations``.

    Args:
        params: raw Gaussian parameters (edited in place, densification replaces entries),
            on the device the run uses (:attr:`device`).
        data: training frames, for that device (:meth:`~gstalk.train.frames.FrameSet.to`).
        cfg: :class:`~gstalk.config.CoarseConfig`.
        scene_scale: head radius in metres (learning rate and densification scale).
        seed: random seed for frame sampling.

    Attributes:
        tracked: [F, 4, 4] the training frames' cameras as ``data`` came (the tracked ones).
        corrections: [F, 6] float32 their pose corrections in prior units
            (:mod:`gstalk.train.pose_refine`); ``data.viewmats`` holds the corrected cameras.
        registered: [F] bool, frames some registration pass has corrected.
        basis: with ``cfg.articulation_basis`` other than ``none``, the per-Gaussian linear
            articulation basis (:func:`init_basis`: ``means``, ``sh0`` [N, D, 3]) each step
            renders its frame's tracked code with (:func:`~gstalk.deform.basis.articulated`); densification edits
            it with the Gaussians. None otherwise.
        pose_history: one dict per registration pass (step, frames registered, failed,
            rejected, the mean shift the registration found in px, mean correction in degrees
            and mm).
    """

    params: torch.nn.ParameterDict
    data: FrameSet
    cfg: CoarseConfig
    scene_scale: float
    seed: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    pose_history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = self.cfg
        self.lr_means0 = c.lr_means * self.scene_scale
        self.optimizers = gaussian_optimizers(self.params, {
            "means": self.lr_means0, "scales": c.lr_scales, "quats": c.lr_quats, "opacities": c.lr_opacities,
            "sh0": c.lr_sh0, "shN": c.lr_shN})
        self.densifier = Densifier(c.densify, self.scene_scale)
        self.device = self.params["means"].device
        self.densify_state = self.densifier.initialize_state(self.params["means"].shape[0], self.device)
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        self.tracked = self.data.viewmats.detach().cpu().clone()
        self.corrections = torch.zeros(len(self.data), 6)
        self.registered = torch.zeros(len(self.data), dtype=torch.bool)
        self.pose_prior = pose_prior(c, pixel_scale(self.data.width))
        self.detail_window = scaled_window(c.detail_window, pixel_scale(self.data.width))
        self.pose_steps = set(schedule(c.iterations, c.pose_passes))
        self.basis: torch.nn.ParameterDict | None = None
        self.basis_optimizers: dict[str, torch.optim.Optimizer] = {}
        if c.articulation_basis != "none":
            if self.data.articulation is None:
                raise TrainingError("articulation_basis needs the training frames' mouth articulation codes.",
                                    hint="run `gstalk track` again (its blendshape names or 68 points give "
                                         "the code), or set articulation_basis=none")
            self.basis = init_basis(self.params["means"].shape[0], self.data.articulation.shape[1], self.device)
            self.basis_optimizers = gaussian_optimizers(self.basis, {"means": c.lr_articulation * self.scene_scale,
                                                                     "sh0": c.lr_sh0})

    def basis_region(self) -> torch.Tensor | None:
        """[N] bool: the Gaussians the articulation basis moves now (``lower_face``), or None
        for every Gaussian (``all``, or no basis)."""
        if self.basis is None or self.cfg.articulation_basis != "lower_face":
            return None
        return lower_face(self.params["means"].detach())

    def basis_tensors(self) -> dict[str, torch.Tensor]:
        """The articulation basis as it acts: ``means`` and ``sh0`` [N, D, 3], zero for the
        Gaussians outside :meth:`basis_region`; {} without a basis."""
        if self.basis is None:
            return {}
        region = self.basis_region()
        w = 1.0 if region is None else region.to(self.basis["means"].dtype)[:, None, None]
        return {k: (v.detach() * w).contiguous() for k, v in self.basis.items()}

    def basis_summary(self) -> dict[str, Any]:
        """For the stage's summary: the region, how many Gaussians it holds and how far the
        basis moves them (mean over them and the code's dimensions, mm per standard deviation)."""
        if self.basis is None:
            return {"region": "none"}
        region = self.basis_region()
        mm = self.basis["means"].detach().norm(dim=-1) * 1000.0  # [N, D]
        if region is not None:
            mm = mm[region]
        return {"region": self.cfg.articulation_basis, "gaussians": int(len(mm)),
                "mean_mm_per_sd": float(mm.mean()) if len(mm) else 0.0}

    def checkpoint_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer of the run by checkpoint name: the Gaussians' (``means``, ...) and
        the articulation basis's (``basis_means``, ``basis_sh0``)."""
        return {**self.optimizers, **{f"basis_{k}": o for k, o in self.basis_optimizers.items()}}

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        """The run's state besides the Gaussians and optimizers, by checkpoint name: pose
        ``corrections`` [F, 6], ``registered`` [F] uint8, and the basis (``basis_means``,
        ``basis_sh0``) when there is one; :meth:`restore_basis` reads the latter back."""
        return {"corrections": self.corrections, "registered": self.registered.to(torch.uint8),
                **{f"basis_{k}": v for k, v in (self.basis or {}).items()}}

    def restore_basis(self, extra: dict[str, torch.Tensor], optim: dict[str, torch.Tensor]) -> None:
        """Put a checkpoint's articulation basis (``extra["basis_means"]``, ``extra["basis_sh0"]``)
        and its Adam moments back (after :func:`~gstalk.train.checkpoint.restore_training`)."""
        from gstalk.train.checkpoint import restore_optimizers

        if self.basis is None:
            return
        for k in self.basis.keys():
            self.basis[k].data.copy_(extra[f"basis_{k}"].to(self.device))
        restore_optimizers({f"basis_{k}": o for k, o in self.basis_optimizers.items()}, optim)

    def set_corrections(self, corrections: torch.Tensor) -> None:
        """Use ``corrections`` [F, 6] (prior units) for the training frames' cameras."""
        self.corrections = corrections.detach().float().cpu().clone()
        vm = corrected_viewmats(self.tracked, self.corrections, self.pose_prior)
        self.data.viewmats = vm.to(self.data.viewmats.device)

    def refine_poses(self, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """One registration pass over the training frames against the current Gaussians;
        returns its statistics (also appended to :attr:`pose_history`)."""
        n = len(self.data)
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], n)

        params = {k: v.detach() for k, v in self.params.items()}
        res = registration_pass(params, self.data, self.tracked, self.corrections, self.pose_prior,
                                backend=self.cfg.raster, sh_degree=self.sh_degree(), progress=tick)
        self.set_corrections(res.corrections)
        self.registered |= res.registered
        stats = {"step": float(self.step), **correction_stats(res.corrections, self.pose_prior),
                 "registered": float(res.registered.sum()), "failed": float(res.failed),
                 "rejected": float(res.rejected),
                 "shift_px": float(res.shift_px[res.registered].mean()) if res.registered.any() else float("nan")}
        self.pose_history.append(stats)
        return stats

    def sh_degree(self) -> int:
        """Active SH degree: one more band every 1000 steps (3DGS), up to the stored degree."""
        stored = int(round(math.sqrt(1 + self.params["shN"].shape[1]))) - 1
        return min(stored, self.step // 1000)

    def train_step(self) -> dict[str, float]:
        c, d = self.cfg, self.data
        i = int(self.rng.integers(len(d)))
        for g in self.optimizers["means"].param_groups:
            g["lr"] = exp_decay(self.step, c.iterations, self.lr_means0, self.lr_means0 * 0.01)
        params: Any = self.params
        if self.basis is not None:
            lr0 = c.lr_articulation * self.scene_scale
            for g in self.basis_optimizers["means"].param_groups:
                g["lr"] = exp_decay(self.step, c.iterations, lr0, lr0 * 0.01)
            params = articulated(self.params, self.basis, d.articulation[d.frame_ids[i]], self.basis_region())
        colors, alphas, meta = splat(params, d.viewmats[i:i + 1], d.K, d.width, d.height, backend=c.raster,
                                     sh_degree=self.sh_degree())
        pred = composite(colors, alphas, d.background(i))
        gt = d.image(i)
        loss = photometric_loss(pred, gt, c.ssim_lambda)
        if c.detail_lambda > 0:
            loss = loss + c.detail_lambda * detail_loss(pred, gt, self.detail_window)
        if not torch.isfinite(loss):
            raise TrainingError(f"coarse loss became {loss.item()} at step {self.step} (frame {int(d.frame_ids[i])}).",
                                hint="run the coarse stage again with `--raster torch` to rule out the compiled "
                                     "rasterizer; if it persists, extract again with another `--seed`")
        self.densifier.step_pre_backward(meta)
        loss.backward()
        extra = ((self.basis, self.basis_optimizers),) if self.basis is not None else ()
        changes = self.densifier.step_post_backward(self.params, self.optimizers, self.densify_state, self.step,
                                                    meta, d.width, d.height, extra_params=extra)
        for opt in (*self.optimizers.values(), *self.basis_optimizers.values()):
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        out = {"loss": float(loss.item()), "n": float(self.params["means"].shape[0])}
        out.update({k: float(v) for k, v in changes.items()})
        return out

    def run(self, callback: Callback | None = None,
            checkpoint: Callable[[CoarseTrainer], None] | None = None,
            pose_progress: Callable[[int, int], None] | None = None) -> list[dict[str, float]]:
        """Train until ``cfg.iterations``; ``callback(step, stats)`` after each step,
        ``checkpoint(self)`` every ``cfg.checkpoint_every`` steps (not after the last), a
        registration pass after each step of the pose schedule (``pose_progress(done,
        total)`` after each of its frames)."""
        while self.step < self.cfg.iterations:
            stats = self.train_step()
            if self.step in self.pose_steps:
                self.refine_poses(pose_progress)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.iterations:
                self.history.append({"step": float(self.step), **stats})
            if callback is not None:
                callback(self.step, stats)
            every = self.cfg.checkpoint_every
            if checkpoint is not None and every > 0 and self.step % every == 0 and self.step < self.cfg.iterations:
                checkpoint(self)
        return self.history


def init_basis(n: int, dim: int, device: torch.device | str = "cpu") -> torch.nn.ParameterDict:
    """A zero per-Gaussian linear articulation basis: ``means`` [N, D, 3] float32 (metres per
    standard deviation of each code dimension) and ``sh0`` [N, D, 3] (SH DC colour per
    standard deviation)."""
    return torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(n, dim, 3, device=device))
                                   for k in ("means", "sh0")})


def lower_face(means: torch.Tensor, margin: float = 0.02) -> torch.Tensor:
    """[N] bool: the Gaussians at ``means`` [N, 3] (canonical space, metres) in the lower face,
    where the mouth code can move them: between the mouth corners widened by ``margin``
    (landmarks 61/291), from the subnasale (landmark 2) down to ``margin`` below the chin
    (152), and in front of the mouth corners' depth less 30 mm (not the neck or the ears)."""
    half, top, chin, front = _lower_face_box()
    x, y, z = means.unbind(-1)
    return (x.abs() < half + margin) & (y < top) & (y > chin - margin) & (z > front)


@lru_cache(maxsize=1)
def _lower_face_box() -> tuple[float, float, float, float]:
    """(mouth corners' half-width, subnasale's y, chin's y, mouth corners' z − 30 mm), metres
    in canonical space, from the canonical face's landmarks 61/291, 2, 152."""
    v = canonical_face().vertices
    return (float(max(abs(v[61, 0]), abs(v[291, 0]))), float(v[2, 1]), float(v[152, 1]),
            float(min(v[61, 2], v[291, 2]) - 0.03))


def pose_prior(cfg: CoarseConfig, scale: float = 1.0) -> PosePrior:
    """The pose corrections' prior of a coarse config for frames ``scale`` times the size its
    pixel settings were chosen at (:func:`gstalk.config.pixel_scale`): the registration noise
    and the Huber threshold, both in pixels, scale with the image, so a registration error of
    the same fraction of the face weighs the same against the prior at 512 px as at 256 px.

    Raises:
        ValueError: ``scale`` is not positive.
    """
    if not scale > 0:
        raise ValueError(f"a pixel scale must be positive, got {scale}")
    return PosePrior(sigma_rot_deg=cfg.pose_sigma_rot_deg,
                     sigma_trans_mm=(cfg.pose_sigma_trans_mm, cfg.pose_sigma_trans_mm, cfg.pose_sigma_depth_mm),
                     noise_px=cfg.pose_noise_px * scale, huber_px=PosePrior.huber_px * scale)


def correction_stats(corrections: torch.Tensor, prior: PosePrior) -> dict[str, float]:
    """Mean size of corrections [F, 6] (prior units): rotation in degrees, translation
    across the image and along the optical axis in millimetres."""
    d = corrections.float() * prior.sigma()
    if len(d) == 0:
        return {"rot_deg": 0.0, "trans_mm": 0.0, "depth_mm": 0.0}
    return {"rot_deg": float(d[:, :3].norm(dim=1).mean() * 180.0 / math.pi),
            "trans_mm": float(d[:, 3:5].norm(dim=1).mean() * 1000.0),
            "depth_mm": float(d[:, 5].abs().mean() * 1000.0)}


def render_frames(params: dict[str, torch.Tensor], data: FrameSet, backend: str = "auto") -> torch.Tensor:
    """Render the static Gaussians for every frame of ``data`` over its background:
    [F, H, W, 3] float32 in [0, 1], on the CPU (``params`` and ``data`` on one device)."""
    out = []
    with torch.no_grad():
        for i in range(len(data)):
            colors, alphas, _ = splat(params, data.viewmats[i:i + 1], data.K, data.width, data.height, backend=backend)
            out.append(composite(colors, alphas, data.background(i)).clamp(0, 1)[0].cpu())
    return torch.stack(out)


def summarise(history: list[dict[str, Any]]) -> dict[str, float]:
    """Final loss and Gaussian count of a history."""
    if not history:
        return {}
    last = history[-1]
    return {"final_loss": last.get("loss", float("nan")), "n_gaussians": last.get("n", 0.0)}
