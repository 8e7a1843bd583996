"""Real spherical harmonics (degrees 0..3) for view-dependent Gaussian colour.

The basis and constants are the real SH used by 3DGS (Kerbl et al. 2023) and gsplat, so
trained coefficients are interchangeable with those tools. Colour is
``max(Σ_k coeff_k · Y_k(d) + 0.5, 0)`` where ``d`` is the unit vector from the camera
centre to the Gaussian mean (world frame).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gstalk.errors import UsageError

#: Y_0^0 = 1 / (2 sqrt(pi))
SH_C0 = 0.28209479177387814
#: sqrt(3) / (2 sqrt(pi)), the degree-1 factor
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)

MAX_SH_DEGREE = 3


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for ``degree`` (``(degree+1)²``)."""
    return (degree + 1) ** 2


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Evaluate the real SH basis functions.

    Args:
        degree: 0..3.
        dirs: ``[..., 3]`` view directions (any length; normalised here; float32/64).

    Returns:
        ``[..., (degree+1)²]`` basis values, same dtype as ``dirs``, ordered as in 3DGS
        (band by band, m = -l..l).

    Raises:
        UsageError: degree outside 0..3.
    """
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise UsageError(f"sh_degree must be in 0..{MAX_SH_DEGREE}, got {degree}.")
    d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3.0 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4.0 * zz - xx - yy),
            SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            SH_C3[4] * x * (4.0 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def sh_to_color(degree: int, coeffs: Tensor, means: Tensor, campos: Tensor) -> Tensor:
    """View-dependent RGB from SH coefficients, per camera (differentiable).

    Args:
        degree: SH degree used (0..3); only the first ``(degree+1)²`` coefficients are read.
        coeffs: ``[N, K, 3]`` SH coefficients, ``K >= (degree+1)²``.
        means: ``[N, 3]`` Gaussian centres in world coordinates (metres).
        campos: ``[B, 3]`` camera centres in world coordinates (metres).

    Returns:
        ``[B, N, 3]`` colours ``max(sh + 0.5, 0)`` (the 3DGS/gsplat offset and clamp).
    """
    k = num_sh_bases(degree)
    dirs = means[None, :, :] - campos[:, None, :]  # [B, N, 3]
    basis = sh_basis(degree, dirs)  # [B, N, k]
    rgb = torch.einsum("bnk,nkc->bnc", basis, coeffs[:, :k, :])
    return torch.clamp_min(rgb + 0.5, 0.0)
