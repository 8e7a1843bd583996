"""Photometric losses (3DGS: L = (1 - λ) L1 + λ D-SSIM, Kerbl et al. 2023, Eq. 7).

Images are [B, H, W, 3] float32 in [0, 1] (channels last, as the rasterizer returns them).
SSIM comes from ``pytorch_msssim`` (11x11 Gaussian window, σ = 1.5).
"""

from __future__ import annotations

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
