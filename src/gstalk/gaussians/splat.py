"""Render raw Gaussian parameters through :func:`gstalk.raster.rasterize` and composite.

Shared by the coarse and fine loops, render and eval, so every stage splats the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from gstalk.gaussians.model import activated, sh_degree_of


def splat(params: dict[str, torch.Tensor], viewmats: torch.Tensor, K: torch.Tensor, width: int, height: int, *,
          backend: str = "auto", sh_degree: int | None = None, extra: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Rasterize raw Gaussians (see :mod:`gstalk.gaussians.model`) into B cameras.

    Args:
        params: raw parameter tensors (means, scales, quats, opacities, sh0, shN).
        viewmats: [B, 4, 4] world-to-camera (OpenCV).
        K: [3, 3] or [B, 3, 3] intrinsics in pixels.
        backend: rasterizer backend name.
        sh_degree: SH degree to evaluate (default: all stored).
        extra: [N, E] extra per-Gaussian channels rendered after RGB (e.g. a dynamism
            weight); SH are then evaluated to RGB in torch first.

    Returns:
        (colours [B, H, W, 3 (+E)] premultiplied by alpha (black background), alphas
        [B, H, W, 1], rasterizer meta).
    """
    from gstalk.raster import rasterize

    a = activated(params)
    deg = sh_degree_of(params) if sh_degree is None else sh_degree
    Ks = K.expand(viewmats.shape[0], 3, 3) if K.dim() == 2 else K
    k = (deg + 1) ** 2
    if extra is None:
        return rasterize(a["means"], a["quats"], a["scales"], a["opacities"], a["sh"][:, :k], viewmats, Ks,
                         width, height, sh_degree=deg, backend=backend)
    if viewmats.shape[0] != 1:
        raise ValueError("extra channels are supported for one camera at a time")
    from gstalk.raster.sh import sh_to_color

    campos = torch.linalg.inv(viewmats)[:, :3, 3]
    rgb = sh_to_color(deg, a["sh"], a["means"], campos)[0]
    feats = torch.cat([rgb, extra], dim=-1)
    return rasterize(a["means"], a["quats"], a["scales"], a["opacities"], feats, viewmats, Ks, width, height,
                     backend=backend)


def composite(colors: torch.Tensor, alphas: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Premultiplied head render over a background image: C + (1 - α)·B, all [B, H, W, 3]."""
    return colors + (1.0 - alphas) * background
