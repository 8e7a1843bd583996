"""Synthetic Gaussian scenes for tests and benchmarks (no data files needed)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pinhole_K(width: int, height: int, focal: float, *, dtype=torch.float32, device="cpu") -> Tensor:
    """``[3, 3]`` intrinsics with focal ``focal`` px and the principal point at the centre."""
    return torch.tensor(
        [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], dtype=dtype, device=device
    )


def head_blob(
    n: int,
    width: int,
    height: int,
    *,
    seed: int = 0,
    channels: int = 3,
    sh_degree: int | None = None,
    dtype=torch.float32,
    device="cpu",
) -> dict:
    """A head-sized blob: N Gaussians uniformly in a ball of radius 0.1 m centred 0.5 m in
    front of an identity camera with focal ``1.2·width`` px; scales log-uniform 1–10 mm,
    opacities uniform in [0.1, 0.9], random rotations and colours.

    Returns:
        dict of ``rasterize`` keyword arguments: means ``[N,3]``, quats ``[N,4]``, scales
        ``[N,3]``, opacities ``[N]``, colors ``[N,C]`` (or SH ``[N,(d+1)²,3]``), viewmats
        ``[1,4,4]``, Ks ``[1,3,3]``, width, height (and sh_degree if given).
    """
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(n, 3, generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = 0.1 * torch.rand(n, 1, generator=g) ** (1.0 / 3.0)
    means = direction * radius + torch.tensor([0.0, 0.0, 0.5])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(1e-3), math.log(1e-2), generator=g))
    opacities = torch.empty(n).uniform_(0.1, 0.9, generator=g)
    if sh_degree is None:
        colors = torch.rand(n, channels, generator=g)
    else:
        colors = 0.3 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g)
    out = dict(
        means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
        viewmats=torch.eye(4)[None], Ks=pinhole_K(width, height, 1.2 * width)[None],
    )  # fmt: skip
    out = {k: v.to(dtype=dtype, device=device) for k, v in out.items()}
    out.update(width=width, height=height)
    if sh_degree is not None:
        out["sh_degree"] = sh_degree
    return out
