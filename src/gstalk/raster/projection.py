"""EWA projection of 3D Gaussians to screen-space 2D Gaussians (torch autograd).

Implements, per camera and Gaussian (Kerbl et al. 2023, Sec. 4; Zwicker et al. 2001):

* ``Σ = R S Sᵀ Rᵀ`` with ``R`` from the normalised wxyz quaternion and ``S = diag(scales)``;
* ``t = W μ + w`` (camera coordinates, OpenCV: x right, y down, z forward, metres);
* ``Σ' = J W Σ Wᵀ Jᵀ + eps2d·I`` where ``J`` is the Jacobian of the pinhole projection at
  ``t``, evaluated with ``t.x/t.z`` and ``t.y/t.z`` clamped to the view frustum widened by
  30 % of the half-FOV on each side (``[-(cx/fx + 0.3·tanfovx), (W-cx)/fx + 0.3·tanfovx]``,
  i.e. ``±1.3·tanfovx`` for a centred principal point, as in 3DGS);
* the 2D mean ``(fx·x/z + cx, fy·y/z + cy)`` in pixels, where pixel ``(i, j)`` has its
  centre at ``(j + 0.5, i + 0.5)``;
* conic = ``Σ'⁻¹`` stored as ``(a, b, c)`` for ``[[a, b], [b, c]]``;
* the radius (no gradient) and the culling rules documented in :func:`project_gaussians`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gstalk.raster.settings import RasterSettings


@dataclass
class Projection:
    """Per-camera screen-space Gaussians; B cameras, N Gaussians.

    Attributes:
        means2d: ``[B, N, 2]`` pixel coordinates (differentiable).
        depths: ``[B, N]`` camera-space z in metres (differentiable).
        conics: ``[B, N, 3]`` inverse 2D covariance ``(a, b, c)`` in px⁻² (differentiable).
        opacities: ``[B, N]`` opacities after the optional antialiasing compensation.
        radii: ``[B, N]`` int32 radius in pixels; 0 = culled.
    """

    means2d: Tensor
    depths: Tensor
    conics: Tensor
    opacities: Tensor
    radii: Tensor


def _rotmat_entries(quats: Tensor) -> list[Tensor]:
    """The 9 entries (row-major) of the rotation matrices of wxyz quaternions, each ``[N]``."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from wxyz quaternions (normalised here).

    Args:
        quats: ``[N, 4]`` (w, x, y, z), any non-zero norm.

    Returns:
        ``[N, 3, 3]`` rotation matrices (column-vector convention, ``p' = R p``).
    """
    return torch.stack(_rotmat_entries(quats), dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariance ``Σ = R S Sᵀ Rᵀ`` (3DGS Eq. 6).

    Args:
        quats: ``[N, 4]`` wxyz quaternions.
        scales: ``[N, 3]`` positive standard deviations along the local axes (metres).

    Returns:
        ``[N, 3, 3]`` covariances in m².
    """
    m = quat_to_rotmat(quats) * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def camera_centers(viewmats: Tensor) -> Tensor:
    """Camera centres ``-Rᵀ t`` in world coordinates from ``[B, 4, 4]`` world-to-camera."""
    rot = viewmats[:, :3, :3]
    return -torch.einsum("bji,bj->bi", rot, viewmats[:, :3, 3])


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    settings: RasterSettings,
) -> Projection:
    """Project N Gaussians into B pinhole cameras (EWA splatting, ``Σ' = J W Σ Wᵀ Jᵀ``).

    Args:
        means: ``[N, 3]`` world positions (metres).
        quats: ``[N, 4]`` wxyz rotations (not necessarily normalised).
        scales: ``[N, 3]`` activated (positive) scales (metres).
        opacities: ``[N]`` activated opacities in [0, 1].
        viewmats: ``[B, 4, 4]`` world-to-camera, OpenCV convention.
        Ks: ``[B, 3, 3]`` intrinsics in pixels (``fx, fy, cx, cy``; skew ignored).
        width, height: image size in pixels.
        near_plane, far_plane: Gaussians with camera z outside ``[near, far]`` are culled.
        settings: ``eps2d``, ``antialiased``, ``radius_mode``, ``alpha_min``, ``radius_clip``.

    Returns:
        :class:`Projection`. A Gaussian is culled (``radii == 0``) when its depth is outside
        ``[near, far]``, its dilated 2D covariance is not positive definite, its radius is
        ``<= radius_clip`` (or 0), or its square bounding box ``mean ± radius`` lies
        entirely off-screen (``x + r <= 0``, ``x - r >= W``, same for y). Radius is
        ``ceil(3·sqrt(λ_max))`` (``"3sigma"``) or ``ceil(sqrt(2·λ_max·ln(o/alpha_min)))``
        (``"opacity"``), λ_max the largest eigenvalue of the dilated covariance (px²).
        Values of culled Gaussians are finite but meaningless.
    """
    B = viewmats.shape[0]
    rot_w = viewmats[:, :3, :3]  # [B, 3, 3]
    # camera-space means as [B, 3, N] (one GEMM), rows x, y, z
    p_cam = torch.matmul(rot_w, means.T) + viewmats[:, :3, 3:4]
    x, y, z = p_cam[:, 0], p_cam[:, 1], p_cam[:, 2]  # [B, N]
    in_depth = (z >= near_plane) & (z <= far_plane)
    z = torch.where(in_depth, z, torch.ones_like(z))  # keep culled entries finite

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [B, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_x, cx / fx + 0.3 * tan_x
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_y, cy / fy + 0.3 * tan_y
    inv_z = 1.0 / z
    ux = torch.clamp(x * inv_z, min=-lim_x_neg, max=lim_x_pos)  # t.x / t.z, clamped
    uy = torch.clamp(y * inv_z, min=-lim_y_neg, max=lim_y_pos)

    # Σ' = M Mᵀ with M = J W R S (2x3): never form the 3x3 covariances.
    rot = torch.stack(_rotmat_entries(quats), dim=0).reshape(3, 3, -1)  # [3(row), 3(col), N]
    rs = rot * scales.T[None, :, :]  # R S: column k scaled by scales[:, k]
    wrs = torch.matmul(rot_w, rs.reshape(3, -1)).reshape(B, 3, 3, -1)  # W R S, [B, 3(row), 3(col), N]
    # J = [[fx/z, 0, -fx·ux/z], [0, fy/z, -fy·uy/z]]
    jx, jy = (fx * inv_z)[:, None, :], (fy * inv_z)[:, None, :]  # [B, 1, N]
    m0 = jx * (wrs[:, 0] - ux[:, None, :] * wrs[:, 2])  # [B, 3, N]
    m1 = jy * (wrs[:, 1] - uy[:, None, :] * wrs[:, 2])
    c00 = (m0 * m0).sum(1)
    c01 = (m0 * m1).sum(1)
    c11 = (m1 * m1).sum(1)
    det_raw = c00 * c11 - c01 * c01
    c00 = c00 + settings.eps2d
    c11 = c11 + settings.eps2d
    det = c00 * c11 - c01 * c01
    valid = in_depth & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    inv_det = 1.0 / det
    conics = torch.stack([c11 * inv_det, -c01 * inv_det, c00 * inv_det], dim=-1)

    opac = opacities[None, :].expand(B, -1)
    if settings.antialiased:
        opac = opac * torch.sqrt(torch.clamp_min(det_raw / det, 0.0))

    means2d = torch.stack([fx * x * inv_z + cx, fy * y * inv_z + cy], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (c00 + c11)
        lam = mid + torch.sqrt(torch.clamp_min(mid * mid - det, 0.0))
        if settings.radius_mode == "3sigma":
            radius = torch.ceil(3.0 * torch.sqrt(lam))
        else:
            ratio = torch.clamp_min(opac.detach() / settings.alpha_min, 1.0)
            radius = torch.ceil(torch.sqrt(2.0 * lam * torch.log(ratio)))
        radius = torch.nan_to_num(radius, nan=0.0).clamp(max=2.0**30)
        valid = valid & (radius > settings.radius_clip) & (radius > 0)
        mx, my = means2d[..., 0].detach(), means2d[..., 1].detach()
        on_screen = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        valid = valid & on_screen
        radii = torch.where(valid, radius, torch.zeros_like(radius)).to(torch.int32)

    return Projection(
        means2d=means2d, depths=p_cam[:, 2], conics=conics, opacities=opac, radii=radii
    )
