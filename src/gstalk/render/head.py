"""The one audio → pixels path: condition windows → audio code → deformation → Gaussians →
rasterize → composite.

:class:`TalkingHead` holds the canonical Gaussians, the deformation model, the intrinsics
and the image size, all on one device, and renders one frame from tensors: the condition
windows of the K frames around it (:meth:`TalkingHead.windows`), the eye blink, the head
pose and a background. The fine loop (:class:`gstalk.train.fine.FineTrainer`, which needs
the gradients), :func:`gstalk.train.fine.render_deformed`, the streaming renderer
(:class:`gstalk.render.driver.HeadRenderer`, used by ``render``, ``eval`` and ``batch``)
and ``bench render`` all call :meth:`TalkingHead.render`; none reads a file.

Conventions: ``viewmat`` is the world(canonical head)-to-camera matrix of the head pose
(OpenCV: x right, y down, z forward, metres), ``K`` the 3x3 intrinsics in pixels; images
are [1, H, W, C] float32 in [0, 1], channels last, premultiplied where they carry alpha.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gstalk.deform.audio import neighbour_indices
from gstalk.deform.base import DeformationModel, Deltas, apply_deltas
from gstalk.deform.basis import articulated, frame_code, stored_basis
from gstalk.device import synchronize
from gstalk.gaussians.splat import composite, splat


@dataclass
class HeadRender:
    """One rendered frame of the talking head.

    Attributes:
        image: [1, H, W, 3] float32 (not clamped): the head over ``background``
            (:func:`composite_over`); with an RGBA background [1, H, W, 4], straight RGB
            and alpha. None when no background was given.
        colors: [1, H, W, 3] float32 head colours premultiplied by alpha (black behind).
        alphas: [1, H, W, 1] float32 head coverage.
        code: the audio code, [1, *model.code_shape].
        deltas: the deformation of the canonical Gaussians (:class:`~gstalk.deform.base.Deltas`).
        channels: [1, H, W, E] the extra per-Gaussian channels the model asked for
            (:meth:`~gstalk.deform.base.DeformationModel.splat_channels`), or None.
        meta: the rasterizer's meta (``means2d`` with its gradient for densification, ``radii``, ...).
    """

    image: torch.Tensor | None
    colors: torch.Tensor
    alphas: torch.Tensor
    code: torch.Tensor
    deltas: Deltas
    channels: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def composite_over(colors: torch.Tensor, alphas: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The premultiplied head over a background.

    Args:
        colors: [B, H, W, 3] premultiplied head colours; alphas: [B, H, W, 1].
        background: [B, H, W, 3] RGB, or [B, H, W, 4] premultiplied RGB and alpha (the
            torso over nothing, ``render --alpha``).

    Returns:
        RGB: ``C + (1 - α)·B`` [B, H, W, 3]; RGBA: straight (not premultiplied) RGB and the
        combined alpha ``α + (1 - α)·α_B`` [B, H, W, 4]. Not clamped.
    """
    if background.shape[-1] == 3:
        return composite(colors, alphas, background)
    rgb = composite(colors, alphas, background[..., :3])  # premultiplied head over premultiplied torso
    a = alphas + (1.0 - alphas) * background[..., 3:4]
    return torch.cat([rgb / a.clamp_min(1e-6), a], dim=-1)


def _clock(device: torch.device, timings: dict | None) -> float:
    """perf_counter() for step timings, after the GPU's queued work (kernels are
    asynchronous: without it a step's time lands on the next one)."""
    if timings is not None:
        synchronize(device)
    return time.perf_counter()


class TalkingHead:
    """Canonical Gaussians + deformation model + camera intrinsics → frames.

    Args:
        params: raw canonical Gaussians (:mod:`gstalk.gaussians.model`): ``means`` [G, 3]
            metres, ``scales`` [G, 3] log metres, ``quats`` [G, 4] wxyz, ``opacities`` [G]
            logits, ``sh0`` [G, 1, 3], ``shN`` [G, k, 3]; a dict or the trainer's
            ``ParameterDict`` (then :meth:`render` is differentiable). With the articulation
            basis (``basis_means``, ``basis_sh0`` [G, D, 3], :mod:`gstalk.deform.basis`) and a
            model driven by articulation codes, each frame's code moves the deformed
            Gaussians through it as well.
        model: the deformation model, on the same device as ``params``.
        K: [3, 3] float32 intrinsics in pixels at ``width`` x ``height`` (moved to the
            Gaussians' device).
        width, height: image size in pixels.
        backend: rasterizer backend (``auto``: the C++ ``cpu`` one on the CPU, gsplat on CUDA).
        cache_spatial: compute the model's audio-independent per-Gaussian features once
            (rendering; the trainer recomputes them, as the Gaussians move).
    """

    def __init__(self, params: Any, model: DeformationModel, K: torch.Tensor, width: int, height: int, *,
                 backend: str = "auto", cache_spatial: bool = False):
        self.params, self.model = params, model
        self.device = params["means"].device
        self.K = K.to(self.device)
        self.width, self.height = int(width), int(height)
        self.backend = backend
        self._spatial: torch.Tensor | None = None
        if cache_spatial:
            with torch.no_grad():
                self._spatial = model.spatial(params["means"])

    def spatial(self) -> torch.Tensor:
        """[G, S] the model's audio-independent features of the canonical Gaussians."""
        if self._spatial is not None:
            return self._spatial
        return self.model.spatial(self.params["means"])

    def windows(self, conditions: torch.Tensor, frame: int) -> torch.Tensor:
        """The condition windows of the K = ``model.smooth`` frames around ``frame`` of a
        condition sequence [N, W, C'] (clamped at its ends): [1, K, W, C']."""
        return conditions[neighbour_indices(frame, self.model.smooth, conditions.shape[0])]

    def render(self, windows: torch.Tensor, blink: torch.Tensor | float, viewmat: torch.Tensor,
               background: torch.Tensor | None = None, *, settings: Any = None,
               timings: dict[str, list[float]] | None = None) -> HeadRender:
        """One frame.

        Args:
            windows: [1, K, W, C'] condition windows (:meth:`windows`), on the device.
            blink: the eye blink in [0, 1]: a float or a [1] tensor.
            viewmat: [1, 4, 4] (or [4, 4]) W2C head pose.
            background: [1, H, W, 3] or [1, H, W, 4] float32 in [0, 1] (see
                :func:`composite_over`), or None.
            settings: the model's own config when it trains (:meth:`FineConfig.model_config`):
                its :meth:`~gstalk.deform.base.DeformationModel.splat_channels` are rendered
                too; None when rendering.
            timings: when given, the seconds of ``deform``, ``raster`` and ``composite`` are
                appended to its lists (``bench render``; the GPU is synchronised first).

        Returns:
            :class:`HeadRender`.
        """
        dev = self.device
        t1 = _clock(dev, timings)
        code = self.model.encode_audio(windows)
        e = blink.to(dev) if isinstance(blink, torch.Tensor) else torch.tensor([float(blink)], device=dev)
        deltas = self.model.deform(self.spatial(), code[0], e)
        deformed = apply_deltas(dict(self.params.items()), deltas)
        # the linear articulation term (gstalk.deform.basis), for a model driven by articulation
        # codes; looked up each frame, as densification replaces the trainer's tensors
        basis = stored_basis(self.params) if self.model.articulator is not None else None
        if basis is not None:
            deformed = articulated(deformed, basis, frame_code(windows).to(deformed["means"].dtype))
        extra = self.model.splat_channels(deltas, settings) if settings is not None else None
        t2 = _clock(dev, timings)
        colors, alphas, meta = splat(deformed, viewmat.reshape(1, 4, 4).to(dev), self.K, self.width, self.height,
                                     backend=self.backend, extra=extra)
        channels = None
        if extra is not None:
            colors, channels = colors[..., :3], colors[..., 3:]
        t3 = _clock(dev, timings)
        image = None if background is None else composite_over(colors, alphas, background)
        if timings is not None:
            for k, dt in (("deform", t2 - t1), ("raster", t3 - t2), ("composite", _clock(dev, timings) - t3)):
                timings.setdefault(k, []).append(dt)
        return HeadRender(image=image, colors=colors, alphas=alphas, code=code, deltas=deltas, channels=channels,
                          meta=meta)
