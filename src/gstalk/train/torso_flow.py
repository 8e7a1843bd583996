"""The torso's residual flow: what the pose-conditioned field and its rigid warp leave.

The torso field (:mod:`gstalk.deform.torso`) follows the head pose, and each frame's
registered turn, scale and shift (:func:`gstalk.train.pose_refine.torso_warps`) move it as a
whole. What neither can tell is the shoulders rising and falling, or a collar bending: on a
phone clip (man-black-sweater) the field's shoulder line lay up to 5 px above the frame's on
training frames, and 61 % of the held-out squared error was in a band a few pixels outside the
person (docs/methods.md, "Torso: residual flow").

After training, each frame gets a coarse residual flow of the rendered torso layer: a G × G
grid of image displacements d (bilinear between nodes on the image's corners,
:func:`~gstalk.deform.torso.warp_layer`), fitted by Adam to minimise, over the pixels outside
the frame's head mask,

    mean ‖warp(torso, d) over plate − frame's torso over plate‖²
        + λ_mag mean d² + λ_smooth mean (Δd)²

(d in pixels at the trained size; Δ between neighbouring nodes), each node clamped to
``max_px``; fitted on images downsampled 2× with bilinear sampling (a fifth of the time of a
full-size fit, the same error to within 2 %). Renders move the torso Gaussians by the flow
(:func:`~gstalk.deform.torso.displace_means`), which to first order is the same warp.
Like the registered warps, a test frame's flow comes from the test frame itself (the body's
motion cannot be predicted from the audio), with the field frozen; a render with new audio
takes its pose frame's. Pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gstalk.deform.torso import TorsoField, render_torso, warp_layer
from gstalk.gaussians.splat import composite
from gstalk.train.frames import FrameSet


@dataclass(frozen=True)
class FlowFit:
    """Settings of :func:`fit_flows` (defaults: ``FineConfig.torso_flow_*``).

    Attributes:
        steps: Adam steps per frame.
        lr_px: Adam's learning rate, pixels per step.
        max_px: each node's displacement is clamped to this many pixels per axis.
        mag: λ_mag, weight of the mean squared displacement (per px²).
        smooth: λ_smooth, weight of the mean squared difference between neighbouring nodes (per px²).
        chunk: frames fitted together (one batch).
        downsample: fit on images this many times smaller (box filter; 2 costs a quarter of
            the time), the flow then applies at the full size.
    """

    steps: int = 30
    lr_px: float = 0.5
    max_px: float = 8.0
    mag: float = 1e-5
    smooth: float = 1e-4
    chunk: int = 16
    downsample: int = 2


def scaled_flow_fit(settings: FlowFit, scale: float) -> FlowFit:
    """``settings`` for images ``scale`` times the size they were chosen at
    (:func:`gstalk.config.pixel_scale`): the step, the clamp and the downsampling scale with
    the image, and the prior's weights (per px²) by 1 / scale², so the same displacement of the
    body, as a fraction of the image, costs the same and is fitted at the same resolution."""
    import dataclasses

    if scale <= 0:
        raise ValueError(f"a pixel scale must be positive, got {scale}")
    return dataclasses.replace(settings, lr_px=settings.lr_px * scale, max_px=settings.max_px * scale,
                               mag=settings.mag / scale ** 2, smooth=settings.smooth / scale ** 2,
                               downsample=max(1, int(round(settings.downsample * scale))))


def flow_penalty(d_px: torch.Tensor, mag: float, smooth: float) -> torch.Tensor:
    """λ_mag mean d² + λ_smooth mean (Δd)² per frame: d_px [B, 2, G, G] pixels -> [B]."""
    dx = (d_px[..., :, 1:] - d_px[..., :, :-1]).pow(2).flatten(1).mean(1)
    dy = (d_px[..., 1:, :] - d_px[..., :-1, :]).pow(2).flatten(1).mean(1)
    return mag * d_px.pow(2).flatten(1).mean(1) + smooth * (dx + dy)


def px_to_grid(d_px: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Displacements in pixels [..., 2, G, G] -> grid-sample units (``align_corners=True``)."""
    s = d_px.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    return d_px * s[:, None, None]


def fit_flows(torso: TorsoField, data: FrameSet, grid: int, settings: FlowFit = FlowFit(), *,
              backend: str = "auto", progress: Callable[[int], None] | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit each frame's residual flow to the frame (the field and its warps frozen).

    Args:
        torso: the trained :class:`~gstalk.deform.torso.TorsoField` (its turns and offsets
            registered), on ``data``'s device; its own flows are not read (the layer is
            rendered without them).
        data: the frames (``backgrounds`` = torso over plate, ``head_masks``, ``plate``,
            ``viewmats``, ``K``, ``frame_ids``).
        grid: G ≥ 2, nodes per side.
        settings: :class:`FlowFit`.
        progress: called with the number of frames finished after each chunk.

    Returns:
        (flows [F, 2, G, G] float32 in grid-sample units, on the CPU, in ``data``'s order;
        stats: ``frames``, ``mean_px`` / ``max_px`` (node displacement), ``mse_before`` /
        ``mse_after`` (mean over frames of the squared error outside the head, at the fitting
        size)).
    """
    if grid < 2:
        raise ValueError(f"a residual flow grid needs at least 2 nodes per side, got {grid}")
    import torch.nn.functional as F

    s = max(int(settings.downsample), 1)

    def small(x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] -> [B, H/s, W/s, C], box filter
        return x if s == 1 else F.avg_pool2d(x.permute(0, 3, 1, 2), s, ceil_mode=True).permute(0, 2, 3, 1)

    plate = small(data.plate_image())
    h, w = plate.shape[1], plate.shape[2]
    flows, before, after = [], [], []
    for start in range(0, len(data), settings.chunk):
        idx = list(range(start, min(start + settings.chunk, len(data))))
        with torch.no_grad():
            layers = [render_torso(torso, data.viewmats[i:i + 1], data.K, data.width, data.height, backend=backend,
                                   frame=int(data.frame_ids[i]), flow=False) for i in idx]
        colors = small(torch.cat([c for c, _ in layers]))
        alphas = small(torch.cat([a for _, a in layers]))
        target = small(torch.cat([data.background(i) for i in idx]))
        keep = 1.0 - small(torch.cat([data.head_mask(i) for i in idx]))  # [B, H/s, W/s, 1]
        d_px, e0, e1 = fit_chunk(colors, alphas, plate, target, keep, grid, settings, scale=s)
        before.append(e0)
        after.append(e1)
        flows.append(px_to_grid(d_px, w, h).cpu())
        if progress is not None:
            progress(len(idx))
    if not flows:
        return torch.zeros(0, 2, grid, grid), {"frames": 0.0}
    out = torch.cat(flows)
    px = out / px_to_grid(torch.ones(2, 1, 1), data.width, data.height)
    return out, {"frames": float(len(out)), "mean_px": float(px.abs().mean()), "max_px": float(px.abs().max()),
                 "mse_before": float(torch.cat(before).mean()), "mse_after": float(torch.cat(after).mean())}


def fit_chunk(colors: torch.Tensor, alphas: torch.Tensor, plate: torch.Tensor, target: torch.Tensor,
              keep: torch.Tensor, grid: int, settings: FlowFit, scale: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on the flows of a batch of frames (the module's objective): the layers (colors [B,
    H, W, 3] premultiplied, alphas [B, H, W, 1]), ``plate`` [1, H, W, 3], ``target`` [B, H, W, 3]
    and ``keep`` [B, H, W, 1] at the fitting size, ``scale`` times smaller than the trained
    size (the prior and the clamp are in trained-size pixels).

    Returns:
        (displacements [B, 2, G, G] in pixels at the fitting size, the error before [B] and
        after [B], :func:`layer_error`).
    """
    h, w = colors.shape[1], colors.shape[2]
    d_px = torch.zeros(colors.shape[0], 2, grid, grid, device=colors.device, requires_grad=True)
    opt = torch.optim.Adam([d_px], lr=settings.lr_px / scale)
    with torch.no_grad():
        before = layer_error(colors, alphas, px_to_grid(d_px, w, h), plate, target, keep)
    for _ in range(settings.steps):
        opt.zero_grad(set_to_none=True)
        err = layer_error(colors, alphas, px_to_grid(d_px, w, h), plate, target, keep)
        (err + flow_penalty(d_px * scale, settings.mag, settings.smooth)).sum().backward()
        opt.step()
        with torch.no_grad():
            d_px.clamp_(-settings.max_px / scale, settings.max_px / scale)
    with torch.no_grad():
        after = layer_error(colors, alphas, px_to_grid(d_px, w, h), plate, target, keep)
    return d_px.detach(), before, after


def layer_error(colors: torch.Tensor, alphas: torch.Tensor, flow: torch.Tensor, plate: torch.Tensor,
                target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-frame mean squared error of the warped layer over the plate against the target,
    over the pixels ``keep`` weighs (:func:`~gstalk.deform.torso.warp_layer`, bilinear).

    Args:
        colors: [B, H, W, 3] premultiplied; alphas: [B, H, W, 1]; flow: [B, 2, G, G]
            grid-sample units; plate: [1, H, W, 3]; target: [B, H, W, 3]; keep: [B, H, W, 1]
            weights in [0, 1] (1 - the head mask).

    Returns:
        [B] float32, (intensity units)² with intensities in [0, 1].
    """
    c, a = warp_layer(colors, alphas, flow)
    se = (composite(c, a, plate) - target).pow(2).mean(-1, keepdim=True)
    return (se * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1.0)


def set_flows(torso: TorsoField, frame_ids: torch.Tensor, flows: torch.Tensor) -> None:
    """Store fitted flows [F, 2, G, G] (grid-sample units) for clip frames ``frame_ids`` [F]
    (int64) in ``torso.flows``.

    Raises:
        ValueError: the field has no residual flows (``flow_grid`` 0).
    """
    if torso.flow_grid == 0:
        raise ValueError("this torso field has no residual flows (flow_grid 0)")
    torso.flows[frame_ids.to(torso.flows.device)] = flows.to(torso.flows)
