"""Spatial encoders of canonical Gaussian positions.

``TriPlaneHash`` factorises a 3D field into three axis-aligned planes (xy, xz, yz), each a
2D multi-resolution hash grid (GSTalker's "multi-resolution hashing grid-based tri-plane",
as in ER-NeRF/TalkingGaussian); the plane features are concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

from gstalk.deform.hashgrid import HashGrid


class TriPlaneHash(nn.Module):
    """Tri-plane of 2D hash grids over an axis-aligned box.

    Args:
        aabb: [2, 3] float32 (min, max corners) of the canonical box in metres; positions
            are normalised to [0, 1]^3 inside it (and clamped outside).
        levels, features, log2_table, base_res, max_res: per-plane :class:`HashGrid` settings.

    Input: [N, 3] positions (metres, canonical space). Output: [N, 3·L·F].
    """

    PLANES = ((0, 1), (0, 2), (1, 2))

    def __init__(self, aabb: torch.Tensor, levels: int = 12, features: int = 2, log2_table: int = 14,
                 base_res: int = 16, max_res: int = 512, init_scale: float = 1e-4):
        super().__init__()
        self.register_buffer("aabb", aabb.detach().clone().float())
        self.grids = nn.ModuleList(HashGrid(2, levels, features, log2_table, base_res, max_res, init_scale=init_scale)
                                   for _ in self.PLANES)

    @property
    def out_dim(self) -> int:
        return sum(g.out_dim for g in self.grids)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Positions [N, 3] -> [N, 3] in [0, 1] relative to the box."""
        lo, hi = self.aabb[0], self.aabb[1]
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.normalise(x.detach())
        return torch.cat([g(u[:, list(axes)].contiguous()) for g, axes in zip(self.grids, self.PLANES)], dim=-1)
