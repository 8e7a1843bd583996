"""Dense feature planes and lines, and Audio-Plane's audio factorization plane.

- :class:`DensePlanes`: K-planes-style (Fridovich-Keil et al. 2023) multi-resolution dense
  2D feature planes on the xy, xz and yz axes, read by bilinear interpolation.
- :class:`LineGrids`: dense 1D feature grids along x, y and z, read by linear interpolation.
- :class:`AudioFactorizationPlane`: Audio-Plane (Sec. 3.3, Eq. 4-6): three audio-independent
  space planes P_XY, P_XZ, P_YZ and three audio-dependent "planes" spanned by a spatial line
  L_k and an audio prototype grid A read by cross-attention with the audio as the query.

Positions are normalised to [0, 1]^3 inside the canonical box before lookup (outside it
they are clamped), as in :class:`~gstalk.deform.encoders.TriPlaneHash`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PLANES = ((0, 1), (0, 2), (1, 2))
"""Axis pairs of the three space planes (xy, xz, yz)."""
LINES = (2, 1, 0)
"""The axis left out of each plane of :data:`PLANES`: the line paired with it (z, y, x)."""


def sample_plane(plane: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup (``align_corners=True``: texel i sits at u = i / (R - 1)).

    Args:
        plane: [D, R, R] features; axis 1 indexes v (rows), axis 2 indexes u (columns).
        uv: [N, 2] coordinates in [0, 1].

    Returns:
        [N, D].
    """
    grid = (uv * 2.0 - 1.0).reshape(1, -1, 1, 2)
    out = F.grid_sample(plane[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, :, 0].T


def sample_line(line: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Linear lookup on a 1D grid (texel i at u = i / (R - 1)), through ``grid_sample`` on a
    one-row image (its CPU backward is several times faster than an indexed gather's).

    Args:
        line: [D, R] features.
        u: [N] coordinates in [0, 1].

    Returns:
        [N, D].
    """
    uv = torch.stack([u, torch.zeros_like(u)], dim=-1)
    return sample_plane(line[:, None, :], uv)


class DensePlanes(nn.Module):
    """Multi-resolution dense feature planes on the xy, xz and yz axes (K-planes' spatial
    planes; Audio-Plane's P_XY, P_XZ, P_YZ).

    Args:
        resolutions: R per scale (Audio-Plane: s·H for s = 1..4, H = 64).
        dim: D features per plane.
        init: planes start uniform in [init[0], init[1]] (K-planes: [0.1, 0.5], so that
            the products of Eq. 6 start away from zero).

    Input: [N, 3] in [0, 1]. Output: list over scales of [3, N, D] (one row per plane).
    """

    def __init__(self, resolutions: tuple[int, ...], dim: int, init: tuple[float, float] = (0.1, 0.5)):
        super().__init__()
        self.resolutions, self.dim = tuple(resolutions), dim
        self.planes = nn.ParameterList(
            nn.Parameter(torch.empty(3, dim, r, r).uniform_(*init)) for r in self.resolutions)

    def forward(self, u: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([sample_plane(p[j], u[:, list(ax)]) for j, ax in enumerate(PLANES)])
                for p in self.planes]


class LineGrids(nn.Module):
    """Multi-resolution dense 1D feature grids along z, y and x (Audio-Plane's L_Z, L_Y, L_X,
    in the order that pairs them with :data:`PLANES`).

    Input: [N, 3] in [0, 1]. Output: list over scales of [3, N, D].
    """

    def __init__(self, resolutions: tuple[int, ...], dim: int, init: tuple[float, float] = (0.9, 1.1)):
        super().__init__()
        self.resolutions, self.dim = tuple(resolutions), dim
        self.lines = nn.ParameterList(nn.Parameter(torch.empty(3, dim, r).uniform_(*init)) for r in self.resolutions)

    def forward(self, u: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([sample_line(g[j], u[:, ax]) for j, ax in enumerate(LINES)]) for g in self.lines]


class AudioFactorizationPlane(nn.Module):
    """Audio-Plane's audio factorization plane (Audio-Plane Sec. 3.3, Eq. 4-6).

    Per scale s (resolution R_s = s·H): the space planes P^s_ij [R_s, R_s, D], the lines
    L^s_k [R_s, D] and the audio prototype grid A^s [R_s, D]. For a Gaussian at x with the
    frame's audio code a:

    - Eq. 4: f^s_a = softmax(q^s (A^s)ᵀ / √D) A^s with q^s = W^s_q LN(a) (the audio code,
      layer-normalised, projected to D; K = V = A^s): [D], the same for every Gaussian of
      the frame;
    - Eq. 5: f^s_ka = f^s_k · f^s_a, f^s_k = Interp(L^s_k)(x_k);
    - Eq. 6: f = ⋃_s ⋃_(i,j,k) Interp(P^s_ij)(x_i, x_j) · f^s_k · f^s_a (⋃ = concatenation),
      (i, j, k) ∈ {(X, Y, Z), (X, Z, Y), (Y, Z, X)}.

    The audio-independent part S^s_ijk = Interp(P^s_ij) · f^s_k is :meth:`spatial`; a
    renderer computes it once and :meth:`modulate` applies each frame's audio.

    Args:
        aabb: [2, 3] canonical box (metres).
        audio_dim: size of the audio code a.
        dim: D (paper 16); base_res: H (paper 64); scales: s values (paper 1, 2, 3, 4).

    Shapes: :meth:`spatial` [N, 3] metres -> [N, S·3·D]; :meth:`attend` [A] -> [S, D];
    :meth:`modulate` ([N, S·3·D], [S, D]) -> [N, S·3·D].
    """

    def __init__(self, aabb: torch.Tensor, audio_dim: int, dim: int = 16, base_res: int = 64,
                 scales: tuple[int, ...] = (1, 2, 3, 4)):
        super().__init__()
        self.register_buffer("aabb", aabb.detach().clone().float())
        self.dim, self.scales = dim, tuple(scales)
        res = tuple(s * base_res for s in self.scales)
        self.space = DensePlanes(res, dim)
        self.lines = LineGrids(res, dim)
        # audio prototype grids: N(0, 1). (Near-identical rows, e.g. all ≈ 1 as K-planes starts its
        # time planes, make f_a independent of the query and its gradient vanish: the audio
        # would never be learnt. The deformation head starts at zero, so ΔG = 0 at step 0
        # anyway.)
        self.prototypes = nn.ParameterList(nn.Parameter(torch.randn(r, dim)) for r in res)
        self.query_norm = nn.LayerNorm(audio_dim)  # pre-norm of the query (transformer practice)
        self.query = nn.ModuleList(nn.Linear(audio_dim, dim) for _ in res)

    @property
    def out_dim(self) -> int:
        return len(self.scales) * 3 * self.dim

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.aabb[0], self.aabb[1]
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)

    def spatial(self, means: torch.Tensor) -> torch.Tensor:
        """S^s_ijk = Interp(P^s_ij) · Interp(L^s_k) for all scales and planes: [N, S·3·D]."""
        u = self.normalise(means.detach())
        parts = [p * ln for p, ln in zip(self.space(u), self.lines(u))]  # each [3, N, D]
        return torch.cat([q.permute(1, 0, 2).reshape(u.shape[0], -1) for q in parts], dim=1)

    def attend(self, audio_code: torch.Tensor) -> torch.Tensor:
        """Eq. 4: the audio feature f^s_a per scale from the prototype grids: [S, D]."""
        out = []
        a = self.query_norm(audio_code.reshape(-1))
        for proto, q in zip(self.prototypes, self.query):
            scores = q(a) @ proto.T / math.sqrt(self.dim)  # [R_s]
            out.append(torch.softmax(scores, dim=-1) @ proto)
        return torch.stack(out)

    def modulate(self, spatial: torch.Tensor, f_audio: torch.Tensor) -> torch.Tensor:
        """Eq. 5-6: S^s_ijk · f^s_a, concatenated: [N, S·3·D]."""
        n = spatial.shape[0]
        s = spatial.reshape(n, len(self.scales), 3, self.dim)
        return (s * f_audio[None, :, None, :]).reshape(n, -1)

    def forward(self, means: torch.Tensor, audio_code: torch.Tensor) -> torch.Tensor:
        """f of Eq. 6 for each Gaussian: means [N, 3] metres, audio_code [A] -> [N, S·3·D]."""
        return self.modulate(self.spatial(means), self.attend(audio_code))
