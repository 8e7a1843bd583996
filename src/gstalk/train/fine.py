"""The fine stage's loop: train the audio-driven deformation of the canonical Gaussians.

Each step draws a training frame t, encodes the condition windows of the K frames around
t, deforms the canonical Gaussians G' = G + ΔG(μ, c_t, e_t), renders them with frame t's
camera over its background and minimises
(1 - λ) L1 + λ D-SSIM + w_mouth · L1(mouth mask) + w_reg · mean|ΔG| (+ λ_mask · L_mask
for a model with a dynamism weight, Audio-Plane Eq. 8-9; + λ_lpips · LPIPS when the user
gives LPIPS weights, ``lpips_weights``). The canonical Gaussians keep
training at a reduced learning rate, as in GSTalker, and 3DGS density control goes on
(clone/split/prune from the screen-space gradients of the *deformed* renders, between
``densify_from`` and ``densify_until``), as GSTalker and TalkingGaussian do. A model with a
torso field (:mod:`gstalk.deform.torso`) trains it in the same step, on its own layer:
its render over the background plate against the frame's torso over the plate.

With ``conditioning="articulation"`` (the default) a fresh run first fits the model's
audio → articulation regressor (:func:`~gstalk.deform.articulation.fit_articulation`,
seconds) and freezes it; the condition c_t of a training frame is then its *tracked*
articulation code plus N(0, σ²) noise drawn anew at every step, and frames outside the
training set (neighbours at the split) use the regressor's prediction. Render and eval use
the prediction everywhere. With ``conditioning="audio"`` c_t is the audio window itself.

A step whose loss is NaN/Inf is skipped and counted (the checkpoint keeps the last good
state); too many in a row raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gstalk.config import CoarseConfig, DensifyConfig, FineConfig
from gstalk.deform.articulation import fit_ensemble
from gstalk.deform.audio import neighbour_indices
from gstalk.deform.base import DeformationModel, Deltas, apply_deltas
from gstalk.errors import TrainingError
from gstalk.gaussians.densify import Densifier
from gstalk.gaussians.splat import composite, splat
from gstalk.train.coarse import exp_decay, gaussian_optimizers
from gstalk.train.frames import FrameSet
from gstalk.train.losses import dilate_mask, mask_margin_loss, masked_l1, photometric_loss

Callback = Callable[[int, dict[str, float]], None]


def model_optimizer(model: torch.nn.Module, lr_net: float, lr_grid: float) -> torch.optim.Optimizer:
    """Adam with two groups: feature grids (hash tables, dense planes, lines and audio
    prototypes: ``lr_grid``) and everything else (``lr_net``); the articulation regressor
    (fitted on its own, then frozen) and the torso (:func:`torso_optimizer`) are left out."""
    grid, net = [], []
    for name, p in model.named_parameters():
        if name.startswith(("articulator.", "torso.")):
            continue
        is_grid = name.endswith("table") or any(k in name for k in (".planes.", ".lines.", ".prototypes."))
        (grid if is_grid else net).append(p)
    groups = [{"params": net, "lr": lr_net, "name": "net"}]
    if grid:
        groups.append({"params": grid, "lr": lr_grid, "name": "grid", "eps": 1e-15})
    return torch.optim.Adam(groups, betas=(0.9, 0.99))


def torso_optimizer(torso: torch.nn.Module, scene_scale: float, lr_field: float) -> torch.optim.Optimizer:
    """Adam for a :class:`~gstalk.deform.torso.TorsoField`: its Gaussians at the coarse
    stage's rates (means scaled by the head radius, like the head's), its MLP at
    ``lr_field``."""
    base = CoarseConfig()
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
    """

    params: torch.nn.ParameterDict
    model: DeformationModel
    data: FrameSet
    cfg: FineConfig
    scene_scale: float
    seed: int = 0
    from_prior: bool = False
    step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    articulation_fit: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        c, base = self.cfg, CoarseConfig()
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
            self.optimizers["torso"] = torso_optimizer(self.model.torso, self.scene_scale, c.lr_torso)
            self.torso_lrs = {g["name"]: g["lr"] for g in self.optimizers["torso"].param_groups}
        self.lpips = None
        if c.lpips_weights:  # validated (InputError naming the file) before any training
            from gstalk.metrics.lpips import LPIPS

            self.lpips = LPIPS.load(c.lpips_weights)
        self.densifier = None
        if c.densify_until > 0:  # 3DGS density control goes on under the deformation
            self.densifier = Densifier(DensifyConfig(start=c.densify_from, stop=c.densify_until, every=c.densify_every,
                                                     reset_opacity_every=0, max_gaussians=c.densify_max),
                                       self.scene_scale)
        self.densify_state = self.densifier.initialize_state(self.params["means"].shape[0]) if self.densifier else {}
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        if self.data.audio is None:
            raise ValueError("the fine stage needs audio windows in the FrameSet")
        if self.model.articulator is not None and self.data.articulation is None:
            raise ValueError("an articulation-conditioned model needs the tracked articulation in the FrameSet")
        self._base_codes: torch.Tensor | None = None

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
        codes = base[ids] + self.cfg.articulation_noise * torch.randn(len(ids), base.shape[1])
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

    def forward(self, i: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Render training frame ``i`` (position in the set) over its background:
        ([1, H, W, 3] image, [1, A] audio code, rasterizer meta)."""
        d, m = self.data, self.model
        code = m.encode_audio(self.condition_windows(i))
        deltas = m.deform(m.spatial(self.params["means"]), code[0], d.blink[i:i + 1])
        deformed = apply_deltas(dict(self.params.items()), deltas)
        dynamic = deltas.weight is not None and self.cfg.mask_lambda > 0
        colors, alphas, meta = splat(deformed, d.viewmats[i:i + 1], d.K, d.width, d.height, backend=self.cfg.raster,
                                     extra=deltas.weight[:, None] if dynamic else None)
        if dynamic:  # Audio-Plane Eq. 8: the dynamism weights splatted to a grey map g
            meta["dynamism_map"] = colors[..., 3:4]
            colors = colors[..., :3]
        meta["deltas"] = deltas
        return composite(colors, alphas, d.background(i)), code, meta

    def torso_forward(self, i: int) -> torch.Tensor:
        """The torso field for training frame ``i``'s head pose over the background plate:
        [1, H, W, 3] (its target is the frame's torso over the plate, ``data.background``)."""
        from gstalk.deform.torso import render_torso

        d = self.data
        assert self.model.torso is not None
        colors, alphas = render_torso(self.model.torso, d.viewmats[i:i + 1], d.K, d.width, d.height,
                                      backend=self.cfg.raster)
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

    def train_step(self) -> dict[str, float]:
        c, d = self.cfg, self.data
        i = int(self.rng.integers(len(d)))
        self._set_lrs()
        pred, code, meta = self.forward(i)
        gt = d.image(i)
        loss = photometric_loss(pred, gt, c.ssim_lambda)
        if c.mouth_weight > 0:
            loss = loss + c.mouth_weight * masked_l1(pred, gt, d.mouth_mask(i))
        if c.deform_reg > 0:
            loss = loss + c.deform_reg * self.deformation_penalty(meta["deltas"])
        lp = None
        if self.lpips is not None and c.lpips_lambda > 0:
            lp = self.lpips.loss(pred, gt)
            loss = loss + c.lpips_lambda * lp
        if "dynamism_map" in meta:  # Audio-Plane Eq. 9 against the dilated mouth mask
            ref = dilate_mask(d.mouth_mask(i), int(round(c.mask_dilate * d.height)))
            loss = loss + c.mask_lambda * mask_margin_loss(meta["dynamism_map"], ref, c.mask_margin)
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
    :meth:`~gstalk.deform.base.DeformationModel.conditions`) and blink over its background:
    [F, H, W, 3] float32 in [0, 1]."""
    assert data.audio is not None
    out = []
    with torch.no_grad():
        spatial = model.spatial(params["means"])
        cond = model.conditions(data.audio)
        for i in range(len(data)):
            ids = neighbour_indices(int(data.frame_ids[i]), model.smooth, cond.shape[0])
            code = model.encode_audio(cond[ids])[0]
            deformed = apply_deltas(params, model.deform(spatial, code, data.blink[i:i + 1]))
            colors, alphas, _ = splat(deformed, data.viewmats[i:i + 1], data.K, data.width, data.height,
                                      backend=backend)
            out.append(composite(colors, alphas, data.background(i)).clamp(0, 1)[0])
    return torch.stack(out)
