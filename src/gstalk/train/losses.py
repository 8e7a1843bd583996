"""Photometric losses (3DGS: L = (1 - λ) L1 + λ D-SSIM, Kerbl et al. 2023, Eq. 7), the
masked and boxed L1 terms, and the phase-free detail loss (:func:`detail_loss`).

Images are [B, H, W, 3] float32 in [0, 1] (channels last, as the rasterizer returns them).
SSIM comes from ``pytorch_msssim`` (11x11 Gaussian window, σ = 1.5).
"""

from __future__ import annotations

import math

import torch


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of [B, H, W, C] images in [0, 1] (pytorch_msssim, data_range 1): scalar."""
    from pytorch_msssim import ssim as _ssim

    return _ssim(_nchw(pred), _nchw(target), data_range=1.0, size_average=True)


def photometric_loss(pred: torch.Tensor, target: torch.Tensor, ssim_lambda: float) -> torch.Tensor:
    """(1 - λ) · L1 + λ · (1 - SSIM) over [B, H, W, C] images: scalar."""
    l1 = (pred - target).abs().mean()
    if ssim_lambda <= 0:
        return l1
    return (1.0 - ssim_lambda) * l1 + ssim_lambda * (1.0 - ssim(pred, target))


def local_detail_energy(images: torch.Tensor, window: int) -> torch.Tensor:
    """The local mean of the squared Laplacian of the luma: how much pixel-scale detail each
    neighbourhood holds, whatever its phase.

    Args:
        images: [B, H, W, 3] float in [0, 1] (RGB, channels last).
        window: side of the square box the squared Laplacian is averaged over (px, odd).

    Returns:
        [B, 1, H, W] float, (intensity units)²; the Laplacian sees the border's pixels repeated
        (replicate padding) and the box average counts only pixels inside the image (two
        1-D box means, a row then a column: the same as the square box's, in 2·window
        additions per pixel instead of window²).
    """
    from gstalk.metrics.sharpness import LUMA  # eval's luma and Laplacian: the energy the metric counts

    luma = images @ images.new_tensor(LUMA)  # [B, H, W]
    p = torch.nn.functional.pad(luma[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4.0 * luma  # 4-neighbour ∇²
    e = (lap * lap)[:, None]
    r = window // 2
    e = torch.nn.functional.avg_pool2d(e, (1, window), stride=1, padding=(0, r), count_include_pad=False)
    return torch.nn.functional.avg_pool2d(e, (window, 1), stride=1, padding=(r, 0), count_include_pad=False)


def scaled_window(window: int, scale: float) -> int:
    """An odd box side ``window`` (px at 256 px, :data:`gstalk.config.REFERENCE_SIZE_PX`) for
    images ``scale`` times as wide: the nearest odd number of pixels to window × scale, at
    least 1, so the box covers the same part of the face at every working size."""
    return max(1, 2 * int(math.floor((window * scale - 1) / 2 + 0.5)) + 1)


def detail_loss(pred: torch.Tensor, target: torch.Tensor, window: int = 15, eps: float = 1e-6) -> torch.Tensor:
    """Phase-free high-frequency loss: mean |√(E_pred + ε) − √(E_target + ε)| over the pixels,
    with E the local Laplacian energy (:func:`local_detail_energy`) of [B, H, W, 3] images.

    L1 and SSIM ask each pixel for its value, so a static head fitted to many frames whose
    fine detail (skin, hair strands, creases) differs from frame to frame learns their average,
    which has less detail than any one of them. This term asks only for the *amount* of
    detail in each neighbourhood, not where its peaks lie, in the spirit of the amplitude
    (phase-free) term of FreGS's frequency regularisation (Zhang et al., CVPR 2024) and the
    focal frequency loss (Jiang et al., ICCV 2021), taken locally in the image rather than
    over a patch's Fourier spectrum.

    Args:
        pred: [B, H, W, 3] float in [0, 1], the render (differentiated).
        target: [B, H, W, 3] float in [0, 1], the frame (not differentiated).
        window: odd box side in pixels (:func:`scaled_window` scales it with the image).
        eps: (intensity units)², keeps the square root's gradient finite on flat regions.

    Returns:
        Scalar, in intensity units (a Laplacian's magnitude)."""
    e_pred = local_detail_energy(pred, window)
    with torch.no_grad():
        e_target = local_detail_energy(target, window)
    return ((e_pred + eps).sqrt() - (e_target + eps).sqrt()).abs().mean()


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels where ``mask`` [B, H, W, 1] (0..1) is set: scalar."""
    w = mask.expand_as(pred)
    return ((pred - target).abs() * w).sum() / w.sum().clamp_min(1.0)


def box_l1(pred: torch.Tensor, target: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """L1 inside a pixel box (x0, y0, x1, y1) of [B, H, W, C] images: scalar."""
    x0, y0, x1, y1 = box
    return (pred[:, y0:y1, x0:x1] - target[:, y0:y1, x0:x1]).abs().mean()


def mask_margin_loss(g: torch.Tensor, m: torch.Tensor, margin: float) -> torch.Tensor:
    """Audio-Plane's dynamic-splatting loss (Eq. 9), L_mask = max(0, |m − g| − margin), taken
    per pixel and averaged: [B, H, W, 1] splatted dynamism map ``g`` and reference mask ``m``
    (both 0..1) -> scalar.

    The paper writes ‖m − g‖ without saying which norm. Over a whole frame the mouth is
    a few % of the pixels, so a mean-over-pixels norm stays below the 0.2 margin and the
    loss would never act; per pixel, the margin lets d sit anywhere within 0.2 of the mask,
    which is the freedom the paper says it wants ("d can vary smoothly instead of being
    restricted to a binary state")."""
    return torch.relu((m - g).abs() - margin).mean()


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of [B, H, W, 1] masks by a (2·radius + 1)² square: same shape.
    (Two separable max-pools, a row then a column: 2·(2r + 1) comparisons per pixel.)"""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    x = mask.permute(0, 3, 1, 2)
    x = torch.nn.functional.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    x = torch.nn.functional.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))
    return x.permute(0, 2, 3, 1)
