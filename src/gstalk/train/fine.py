"""The fine stage's loop: train the audio-driven deformation of the canonical Gaussians.

Each step draws a training frame t, encodes the condition windows of the K frames around
t, deforms the canonical Gaussians G' = G + ΔG(μ, c_t, e_t), renders them with frame t's
camera over its background and minimises
(1 - λ) L1 + λ D-SSIM + w_mouth · L1(mouth mask) + w_eye · L1(eye boxes) + w_reg · mean|ΔG| (+ λ_mask · L_mask
for a model with a dynamism weight, Audio-Plane Eq. 8-9; + λ_lpips · LPIPS when the user
gives LPIPS weights, ``lpips_weights``); frames with closed eyes are drawn more often
(``blink_oversample``). The canonical Gaussians keep
training at a reduced learning rate, as in GSTalker, and 3DGS density control goes on
(clone/split/prune from the screen-space gradients of the *deformed* renders, between
``densify_from`` and ``densify_until``), as GSTalker and TalkingGaussian do. A model with a
torso field (:mod:`gstalk.deform.torso`) trains it in the same step, on its own layer:
its render over the background plate against the frame's torso over the plate; from 30% of
the iterations on, ``torso_passes`` registration passes measure each frame's torso shift
(:func:`~gstalk.train.pose_refine.torso_shifts`) and the field renders that frame shifted.

With ``conditioning="articulation"`` (the default) a fresh run first fits the model's
audio → articulation regressor (:func:`~gstalk.deform.articulation.fit_articulation`,
seconds) and freezes it; the condition c_t of a training frame is then its *tracked*
articulation code plus N(0, σ²) noise drawn anew at every step, and frames outside the
training set (neighbours at the split) use the regressor's prediction. Render and eval use
the prediction everywhere. With ``conditioning="audio"`` c_t is the audio window itself.

A step whose loss is NaN/Inf is skipped and counted (the checkpoint keeps the last good
state); too many in a row raise.

Every frame goes through the one audio → pixels path (:class:`gstalk.render.head.TalkingHead`),
as in render and eval. The trainer runs where its tensors are: the stage moves the
Gaussians, the model and the frames (:meth:`~gstalk.train.frames.FrameSet.to`) to one
device; random numbers come from torch's CPU generator (:func:`gstalk.device.randn`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gstalk.config import CoarseConfig, DensifyConfig, FineConfig, pixel_scale
from gstalk.deform.articulation import fit_ensemble
from gstalk.deform.audio import neighbour_indices
from gstalk.deform.base import DeformationModel, Deltas
from gstalk.device import randn
from gstalk.errors import TrainingError
from gstalk.gaussians.densify import Densifier
from gstalk.gaussians.splat import composite
from gstalk.render.head import HeadRender, TalkingHead
from gstalk.train.coarse import exp_decay, gaussian_optimizers
from gstalk.train.frames import FrameSet
from gstalk.train.losses import detail_loss, masked_l1, photometric_loss, scaled_window
from gstalk.train.pose_refine import schedule, torso_warps, warp_torso

Callback = Callable[[int, dict[str, float]], None]


def model_optimizer(model: DeformationModel, lr_net: float, lr_grid: float) -> torch.optim.Optimizer:
    """Adam over the groups the model declares (:meth:`~gstalk.deform.base.DeformationModel.param_groups`:
    feature grids at ``lr_grid``, everything else at ``lr_net``; the articulation regressor
    and the torso left out)."""
    return torch.optim.Adam(model.param_groups(lr_net, lr_grid), betas=(0.9, 0.99))


def torso_optimizer(torso: torch.nn.Module, scene_scale: float, lr_field: float,
                    coarse: CoarseConfig | None = None) -> torch.optim.Optimizer:
    """Adam for a :class:`~gstalk.deform.torso.TorsoField`: its Gaussians at the coarse
    stage's rates (``coarse``: the coarse config the workspace recorded; means scaled by the
    head radius, like the head's), its MLP at ``lr_field``."""
    base = coarse or CoarseConfig()
    groups = [{"params": [torso.means], "lr": base.lr_means * scene_scale, "name": "torso_means"},
              {"params": [torso.scales], "lr": base.lr_scales, "name": "torso_scales"},
              {"params": [torso.quats], "lr": base.lr_quats, "name": "torso_quats"},
              {"params": [torso.opacities], "lr": base.lr_opacities, "name": "torso_opacities"},
              {"params": [torso.sh0], "lr": base.lr_sh0, "name": "torso_sh0"},
              {"params": torso.field_parameters(), "lr": lr_field, "name": "torso_field"}]
    return torch.optim.Adam(groups, eps=1e-15)


@dataclass
class FineTrainer:
    """State of a fine run; :meth:`run` trains to ``cfg.iterations``.

    Args:
        params: canonical Gaussians from the coarse stage (raw parameters).
        model: the deformation model.
        data: training frames with audio windows.
        cfg: :class:`~gstalk.config.FineConfig`.
        scene_scale: head radius in metres.
        seed: frame sampling seed.
        from_prior: the model's articulation regressor holds the multi-speaker prior
            (:mod:`gstalk.prior`): :meth:`fit_articulator` adapts it (``articulation_adapt_*``)
            instead of fitting it from scratch.
        coarse: the coarse stage's config as the workspace recorded it: the canonical
            Gaussians keep training at its learning rates times ``cfg.lr_gaussians_scale``.

    ``params``, ``model`` and ``data`` must be on one device (the trainer's :attr:`device`).
    """

    params: torch.nn.ParameterDict
    model: DeformationModel
    data: FrameSet
    cfg: FineConfig
    scene_scale: float
    seed: int = 0
    from_prior: bool = False
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    articulation_fit: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        c, base = self.cfg, self.coarse
        self.device = self.params["means"].device
        s = c.lr_gaussians_scale
        self.lr_means0 = base.lr_means * self.scene_scale * 0.1 * s
        self.optimizers = gaussian_optimizers(self.params, {
            "means": self.lr_means0, "scales": base.lr_scales * s, "quats": base.lr_quats * s,
            "opacities": base.lr_opacities * s, "sh0": base.lr_sh0 * s, "shN": base.lr_shN * s})
        self.optimizers["model"] = model_optimizer(self.model, c.lr_net, c.lr_grid)
        self.base_lrs = [g["lr"] for g in self.optimizers["model"].param_groups]
        if self.model.torso is not None:
            if self.data.plate is None:
                raise ValueError("training a torso field needs the background plate in the FrameSet")
            self.optimizers["torso"] = torso_optimizer(self.model.torso, self.scene_scale, c.lr_torso, base)
            self.torso_lrs = {g["name"]: g["lr"] for g in self.optimizers["torso"].param_groups}
        self.lpips = None
        if c.lpips_weights:  # validated (InputError naming the file) before any training
            from gstalk.metrics.lpips import LPIPS

            self.lpips = LPIPS.load(c.lpips_weights).to(self.device)
        self.densifier = None
        if c.densify_until > 0:  # 3DGS density control goes on under the deformation
            self.densifier = Densifier(DensifyConfig(start=c.densify_from, stop=c.densify_until, every=c.densify_every,
                                                     reset_opacity_every=0, max_gaussians=c.densify_max),
                                       self.scene_scale)
        self.densify_state = self.densifier.initialize_state(self.params["means"].shape[0], self.device) \
            if self.densifier else {}
        self.rng = np.random.default_rng(self.seed)
        self.detail_window = scaled_window(self.cfg.detail_window, pixel_scale(self.data.width))
        torch.manual_seed(self.seed)
        if self.data.audio is None:
            raise ValueError("the fine stage needs audio windows in the FrameSet")
        if self.model.articulator is not None and self.data.articulation is None:
            raise ValueError("an articulation-conditioned model needs the tracked articulation in the FrameSet")
        self._base_codes: torch.Tensor | None = None
        self._draw_p: np.ndarray | None = None
        torso = self.model.torso
        registrable = torso is not None and getattr(torso, "n_frames", 0) > 0 and self.data.torso_masks is not None
        self.torso_steps = set(schedule(c.iterations, c.torso_passes, start=0.3)) if registrable else set()
        self.torso_history: list[dict[str, float]] = []
        self.model_settings = c.model_config()
        self.head = TalkingHead(self.params, self.model, self.data.K, self.data.width, self.data.height,
                                backend=c.raster)

    def fit_articulator(self, progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """Fit the audio → articulation ensemble on the training frames (each member with
        early stopping on their last tenth) and freeze it. Returns
        :func:`~gstalk.deform.articulation.fit_ensemble`'s statistics."""
        reg = self.model.articulator
        assert reg is not None and self.data.articulation is not None
        reg.requires_grad_(True)
        c = self.cfg
        steps, lr = (c.articulation_adapt_steps, c.articulation_adapt_lr) if self.from_prior else \
            (c.articulation_steps, 1e-3)
        stats = fit_ensemble(reg, self.data.audio, self.data.articulation, self.data.frame_ids,
                             steps=steps, lr=lr, seed=self.seed, progress=progress)
        stats["from_prior"] = float(self.from_prior)
        reg.requires_grad_(False)
        # the field trains on tracked codes + N(0, σ²) (std sqrt(1 + σ²) in standardised units):
        # give the predicted codes the same spread
        scale = stats["gain"] * math.sqrt(1.0 + self.cfg.articulation_noise ** 2)
        self.model.code_scale.fill_(scale)
        stats["code_scale"] = scale
        self._base_codes = None
        return stats

    def base_codes(self) -> torch.Tensor:
        """[N_all, D]: tracked articulation on training frames, the model's predicted code
        (:meth:`~gstalk.deform.base.DeformationModel.predict_codes`) on every other frame
        (computed once)."""
        if self._base_codes is None:
            reg, d = self.model.articulator, self.data
            assert reg is not None and d.articulation is not None and d.audio is not None
            reg.requires_grad_(False)
            codes = self.model.predict_codes(d.audio)
            codes[d.frame_ids] = d.articulation[d.frame_ids]
            self._base_codes = codes
        return self._base_codes

    def condition_windows(self, i: int) -> torch.Tensor:
        """Condition windows of the K frames around training frame ``i`` (position in the
        set): [1, K, W, C'], noisy tracked articulation or the audio itself."""
        m, d = self.model, self.data
        if m.articulator is None:
            return d.audio_windows(i, m.smooth)
        base = self.base_codes()
        ids = neighbour_indices(int(d.frame_ids[i]), m.smooth, base.shape[0])[0]
        codes = base[ids] + self.cfg.articulation_noise * randn(len(ids), base.shape[1], device=base.device)
        return m.code_windows(codes)[None]

    def _set_lrs(self) -> None:
        c = self.cfg
        for g, lr0 in zip(self.optimizers["model"].param_groups, self.base_lrs):
            g["lr"] = exp_decay(self.step, c.iterations, lr0, lr0 * 0.1)
        if "means" in self.optimizers:
            for g in self.optimizers["means"].param_groups:
                g["lr"] = exp_decay(self.step, c.iterations, self.lr_means0, self.lr_means0 * 0.1)
        if "torso" in self.optimizers:
            for g in self.optimizers["torso"].param_groups:
                if g["name"] in ("torso_means", "torso_field"):
                    lr0 = self.torso_lrs[g["name"]]
                    g["lr"] = exp_decay(self.step, c.iterations, lr0, lr0 * 0.1)

    def forward(self, i: int) -> HeadRender:
        """Render training frame ``i`` (position in the set) over its background through the
        one audio → pixels path, with the channels the model's own losses need:
        :class:`~gstalk.render.head.HeadRender` (``image`` [1, H, W, 3])."""
        d = self.data
        return self.head.render(self.condition_windows(i), d.blink[i:i + 1], d.viewmats[i:i + 1], d.background(i),
                                settings=self.model_settings)

    def register_torso(self) -> dict[str, float]:
        """One torso registration pass over the training frames: each frame's torso offset
        (and turn, for a field with turns) moves by the warp its render is found off by
        (:func:`~gstalk.train.pose_refine.torso_warps`)."""
        torso = self.model.torso
        assert torso is not None
        warps, valid = torso_warps(torso, self.data, backend=self.cfg.raster,
                                   turns=getattr(torso, "has_turns", False))
        warp_torso(torso, self.data.frame_ids[valid], warps[valid], self.data.K)
        any_ = bool(valid.any())
        stats = {"step": float(self.step), "frames": float(valid.sum()),
                 "shift_px": float(warps[valid, :2].norm(dim=1).mean()) if any_ else 0.0,
                 "turn_deg": float(warps[valid, 2].abs().mean() * 180.0 / math.pi) if any_ else 0.0}
        self.torso_history.append(stats)
        return stats

    def torso_forward(self, i: int) -> torch.Tensor:
        """The torso field for training frame ``i``'s head pose over the background plate:
        [1, H, W, 3] (its target is the frame's torso over the plate, ``data.background``)."""
        from gstalk.deform.torso import render_torso

        d = self.data
        assert self.model.torso is not None
        colors, alphas = render_torso(self.model.torso, d.viewmats[i:i + 1], d.K, d.width, d.height,
                                      backend=self.cfg.raster, frame=int(d.frame_ids[i]))
        return composite(colors, alphas, d.plate_image())

    def deformation_penalty(self, deltas: Deltas) -> torch.Tensor:
        """Mean absolute offset over Gaussians and attributes (position in cm): keeps the
        deformation sparse, so the head is not moved as a whole (that is the camera's job)."""
        parts = [deltas.means * 100.0, deltas.quats, deltas.scales, deltas.opacities, deltas.colors]
        parts = [p if p.dim() == 2 else p[:, None] for p in parts if p is not None]
        if deltas.weight is not None:  # penalise what is applied: d·ΔG
            parts = [p * deltas.weight[:, None] for p in parts]
        return torch.stack([p.abs().mean() for p in parts]).sum()

    def _skip(self, loss: float, what: str) -> dict[str, float]:
        """Skip this step (NaN/Inf ``what``: "loss" or "gradient"); raise TrainingError after
        ``max_bad_steps`` in a row (the last checkpoint is kept)."""
        self.bad_steps += 1
        self.skipped_steps += 1
        self.step += 1
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingError(f"the fine {what} was NaN/Inf for {self.bad_steps} steps in a row "
                                f"(last at step {self.step}).",
                                hint="resume from the last checkpoint with lower learning rates: "
                                     "`gstalk fine WS --resume --set lr_net=5e-4 --set lr_grid=5e-3`")
        return {"loss": loss, "skipped": 1.0}

    def draw_frame(self) -> int:
        """The training frame (position in the set) of the next step: uniform, or with
        ``blink_oversample`` > 0 with probability ∝ 1 + blink_oversample x blink (so the few
        frames with closed eyes are seen often enough to learn them)."""
        k = self.cfg.blink_oversample
        if k <= 0:
            return int(self.rng.integers(len(self.data)))
        if self._draw_p is None:
            w = 1.0 + k * self.data.blink.detach().double().cpu().clamp(0, 1).numpy()
            self._draw_p = w / w.sum()
        return int(self.rng.choice(len(self.data), p=self._draw_p))

    def train_step(self) -> dict[str, float]:
        c, d = self.cfg, self.data
        i = self.draw_frame()
        self._set_lrs()
        out = self.forward(i)
        pred, meta = out.image, out.meta
        assert pred is not None
        gt = d.image(i)
        loss = photometric_loss(pred, gt, c.ssim_lambda)
        if c.detail_lambda > 0:
            loss = loss + c.detail_lambda * detail_loss(pred, gt, self.detail_window)
        if c.mouth_weight > 0:
            loss = loss + c.mouth_weight * masked_l1(pred, gt, d.mouth_mask(i))
        if c.eye_weight > 0 and d.eye_boxes is not None:
            loss = loss + c.eye_weight * masked_l1(pred, gt, d.eye_mask(i))
        if c.deform_reg > 0:
            loss = loss + c.deform_reg * self.deformation_penalty(out.deltas)
        lp = None
        if self.lpips is not None and c.lpips_lambda > 0:
            lp = self.lpips.loss(pred, gt)
            loss = loss + c.lpips_lambda * lp
        for term in self.model.losses(out, d.mouth_mask(i), self.model_settings).values():
            loss = loss + term  # e.g. Audio-Plane's L_mask (Eq. 9)
        torso_loss = None
        if self.model.torso is not None and self.model.torso.n > 0:  # its own layer, its own target
            torso_loss = photometric_loss(self.torso_forward(i), d.background(i), c.ssim_lambda)
            loss = loss + torso_loss
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return self._skip(float("nan"), "loss")
        if self.densifier is not None:
            self.densifier.step_pre_backward(meta)
        loss.backward()
        grads_ok = all(torch.isfinite(p.grad).all() for opt in self.optimizers.values()
                       for g in opt.param_groups for p in g["params"] if p.grad is not None)
        if not grads_ok:
            return self._skip(float(loss.item()), "gradient")
        self.bad_steps = 0
        changes = {}
        if self.densifier is not None:
            gauss = {k: o for k, o in self.optimizers.items() if k in self.params}
            changes = self.densifier.step_post_backward(self.params, gauss, self.densify_state, self.step, meta,
                                                        d.width, d.height)
        for opt in self.optimizers.values():
            opt.step()
        self.step += 1
        out = {"loss": float(loss.item()), "n": float(self.params["means"].shape[0])}
        out.update({k: float(v) for k, v in changes.items()})
        if torso_loss is not None:
            out["torso_loss"] = float(torso_loss.item())
        if lp is not None:
            out["lpips"] = float(lp.item())
        return out

    def run(self, callback: Callback | None = None, checkpoint: Callable[[FineTrainer], None] | None = None
            ) -> list[dict[str, float]]:
        """Train until ``cfg.iterations`` (a fresh articulation-conditioned run whose
        articulator is not fitted yet first calls :meth:`fit_articulator`);
        ``checkpoint(self)`` every ``cfg.checkpoint_every`` steps."""
        if self.step == 0 and self.model.articulator is not None and self.articulation_fit is None:
            self.articulation_fit = self.fit_articulator()
        while self.step < self.cfg.iterations:
            stats = self.train_step()
            if self.step in self.torso_steps:
                self.register_torso()
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.iterations:
                self.history.append({"step": float(self.step), **stats})
            if callback is not None:
                callback(self.step, stats)
            if checkpoint is not None and self.cfg.checkpoint_every > 0 and self.step % self.cfg.checkpoint_every == 0 \
                    and self.step < self.cfg.iterations and math.isfinite(stats.get("loss", float("nan"))):
                checkpoint(self)
        return self.history


def render_deformed(params: dict[str, torch.Tensor], model: DeformationModel, data: FrameSet, *,
                    backend: str = "auto") -> torch.Tensor:
    """Render every frame of ``data`` with its own audio (through the model's
    :meth:`~gstalk.deform.base.DeformationModel.conditions`) and blink over its background,
    through the one audio → pixels path: [F, H, W, 3] float32 in [0, 1], on the CPU
    (``params``, ``model`` and ``data`` on one device)."""
    assert data.audio is not None
    out = []
    with torch.no_grad():
        head = TalkingHead(params, model, data.K, data.width, data.height, backend=backend, cache_spatial=True)
        cond = model.conditions(data.audio)
        for i in range(len(data)):
            r = head.render(head.windows(cond, int(data.frame_ids[i])), data.blink[i:i + 1], data.viewmats[i:i + 1],
                            data.background(i))
            assert r.image is not None
            out.append(r.image.clamp(0, 1)[0].cpu())
    return torch.stack(out)
