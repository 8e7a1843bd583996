"""Kolmogorov-Arnold Network layers (Liu et al. 2024), as EGSTalker's heads use them.

Each edge i -> j of a KAN layer carries a learnable 1D function
φ_ji(x) = w^b_ji · silu(x) + Σ_m c_jim B_m(x), a base activation plus a cubic B-spline on a
uniform grid; the layer sums over i. This is gstalk's own compact layer, vectorised as two
matrix products (the spline basis of every input, then the coefficients), because the
reference library (``pykan``) evaluates edges one by one with symbolic-regression and
plotting machinery and pulls in sympy, scikit-learn and pandas: far too slow for the tens of
thousands of Gaussians a head has, every training step.
"""

from __future__ import annotations

import torch
from torch import nn


def bspline_basis(x: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """B-spline basis functions of ``order`` (3 = cubic) on ``knots`` (Cox-de Boor).

    Args:
        x: [..., I] inputs.
        knots: [I, G + 2·order + 1] non-decreasing knots per input (the grid extended by
            ``order`` knots on each side).
        order: spline order k.

    Returns:
        [..., I, G + order] basis values; inside [knots[order], knots[-order-1]] they sum to 1
        (partition of unity); outside the extended grid they are 0.
    """
    x = x.unsqueeze(-1)
    b = ((x >= knots[:, :-1]) & (x < knots[:, 1:])).to(x.dtype)
    for p in range(1, order + 1):
        left = (x - knots[:, :-(p + 1)]) / (knots[:, p:-1] - knots[:, :-(p + 1)])
        right = (knots[:, p + 1:] - x) / (knots[:, p + 1:] - knots[:, 1:-p])
        b = left * b[..., :-1] + right * b[..., 1:]
    return b


def uniform_cubic_basis(x: torch.Tensor, lo: float, h: float, n_basis: int) -> torch.Tensor:
    """The same as :func:`bspline_basis` for order 3 on the uniform grid lo + h·(m − 3),
    m = 0..n_basis + 3, in closed form: in the cell j of the extended grid containing x, at
    u = fractional position, the four non-zero cubics are (1−u)³/6, (3u³−6u²+4)/6,
    (−3u³+3u²+3u+1)/6 and u³/6 (bases j−3..j), scattered into a dense [..., I, n_basis].

    About 10x cheaper than the recursion in time and autograd memory, which matters with one
    row per Gaussian.
    """
    t = (x - lo) / h + 3.0
    j = torch.floor(t)
    u = t - j
    j = j.long().unsqueeze(-1)
    u2 = u * u
    u3 = u2 * u
    w = torch.stack([(1 - u) ** 3, 3 * u3 - 6 * u2 + 4, -3 * u3 + 3 * u2 + 3 * u + 1, u3], dim=-1) / 6.0
    idx = j + torch.arange(-3, 1, device=x.device)
    valid = (idx >= 0) & (idx < n_basis)
    w = w * valid
    out = torch.zeros(*x.shape, n_basis, dtype=x.dtype, device=x.device)
    return out.scatter_add(-1, idx.clamp(0, n_basis - 1), w)


class KANLinear(nn.Module):
    """One KAN layer: [..., in_dim] -> [..., out_dim].

    y_j = Σ_i w^b_ji silu(x_i) + Σ_i Σ_m c_jim B_m(x_i), the B-splines of ``spline_order``
    on ``grid_size`` uniform intervals over ``grid_range`` (inputs outside it get the base
    term only).

    Args:
        in_dim, out_dim: sizes.
        grid_size: G intervals; spline_order: k (3 = cubic); grid_range: (lo, hi).
        zero_init: start with all weights zero (the last layer of a deformation head, so
            training starts from the canonical Gaussians).
    """

    def __init__(self, in_dim: int, out_dim: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range: tuple[float, float] = (-1.0, 1.0), zero_init: bool = False):
        super().__init__()
        self.in_dim, self.out_dim, self.grid_size, self.spline_order = in_dim, out_dim, grid_size, spline_order
        h = (grid_range[1] - grid_range[0]) / grid_size
        self.lo, self.h = float(grid_range[0]), float(h)
        knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * h + grid_range[0]
        self.register_buffer("knots", knots.expand(in_dim, -1).contiguous())
        self.base = nn.Linear(in_dim, out_dim, bias=False)
        self.spline = nn.Parameter(torch.zeros(out_dim, in_dim * (grid_size + spline_order)))
        if zero_init:
            nn.init.zeros_(self.base.weight)
        else:
            nn.init.normal_(self.spline, std=0.1 / (in_dim * (grid_size + spline_order)) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spline_order == 3:
            basis = uniform_cubic_basis(x, self.lo, self.h, self.grid_size + 3)  # [..., I, G + 3]
        else:
            basis = bspline_basis(x, self.knots, self.spline_order)  # [..., I, G + k]
        return self.base(nn.functional.silu(x)) + basis.flatten(-2) @ self.spline.T


class KAN(nn.Module):
    """A stack of :class:`KANLinear` layers ``in_dim -> hidden x layers -> out_dim`` (the
    last starts at zero). Input [..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, hidden: int, layers: int, out_dim: int, grid_size: int = 5, zero_last: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden] * layers + [out_dim]
        self.layers = nn.ModuleList(
            KANLinear(a, b, grid_size, zero_init=zero_last and i == len(dims) - 2)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
