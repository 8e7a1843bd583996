"""Dense float64 oracle of the rasterizer: every Gaussian against every pixel.

Written independently of the tiled backends (quaternion rotation by Hamilton products,
``torch.linalg`` inverse/eigenvalues/determinants, and a literal per-Gaussian
front-to-back loop with a ``done`` flag, as in the Inria CUDA kernel) but with the same
semantics: culling rules, radius, tile footprint (a Gaussian only touches pixels of the
tiles its bounding box covers), depth order, alpha thresholds and the early stop. Pure
autograd; tiny sizes only (memory ``O(B·H·W·N)``). Tests use it as the ground truth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gstalk.raster.settings import RasterSettings
from gstalk.raster.sh import sh_basis
from gstalk.raster.validation import validate_inputs


def _hamilton(p: Tensor, q: Tensor) -> Tensor:
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack(
        [
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ],
        dim=-1,
    )


def _rotation(quats: Tensor) -> Tensor:
    """``[N, 3, 3]`` matrices whose columns are the rotated basis vectors ``q e_k q*``."""
    q = quats / torch.linalg.vector_norm(quats, dim=-1, keepdim=True)
    conj = q * q.new_tensor([1.0, -1.0, -1.0, -1.0])
    cols = []
    for k in range(3):
        e = torch.zeros_like(q)
        e[:, k + 1] = 1.0
        cols.append(_hamilton(_hamilton(q, e), conj)[:, 1:])
    return torch.stack(cols, dim=-1)


def rasterize_dense(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    settings: RasterSettings | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """Reference rendering in float64 with the contract of :func:`gstalk.raster.rasterize`.

    Same arguments and conventions: ``means [N,3]`` (metres, world), ``quats [N,4]`` wxyz,
    ``scales [N,3]`` (metres), ``opacities [N]``, ``colors [N,C]`` or SH ``[N,K,3]``,
    ``viewmats [B,4,4]`` world-to-camera (OpenCV: x right, y down, z forward), ``Ks [B,3,3]``
    (pixels), pixel centres at ``(x + 0.5, y + 0.5)``. Implements ``Σ = R S Sᵀ Rᵀ``, the EWA
    projection ``Σ' = J W Σ Wᵀ Jᵀ + eps2d·I`` and α-blending (Kerbl et al. 2023, Eq. 2-3)
    literally. Inputs may be float32 or float64 (cast to float64 inside, so gradients reach
    the caller's tensors). Returns float64 ``(colors [B,H,W,C], alphas [B,H,W,1], meta)``
    with ``meta["means2d"]`` ``[B,N,2]`` (retain_grad'ed), ``radii`` ``[B,N]`` int32,
    ``depths``, ``conics``. Cost: O(B·H·W·N) memory; keep H·W·N below ~1e6.

    Raises:
        UsageError: as :func:`gstalk.raster.rasterize`.
    """
    inp = validate_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane, far_plane, sh_degree, backgrounds, settings,
    )  # fmt: skip
    s = inp.settings
    f64 = torch.float64
    means, quats, scales = inp.means.to(f64), inp.quats.to(f64), inp.scales.to(f64)
    opac_all, feats = inp.opacities.to(f64), inp.colors.to(f64)
    views, Ks = inp.viewmats.to(f64), inp.Ks.to(f64)
    B, N, H, W, ts = inp.n_cameras, inp.n_gaussians, height, width, s.tile_size
    tiles_x, tiles_y = math.ceil(W / ts), math.ceil(H / ts)
    dev = means.device

    rot = _rotation(quats)
    cov3 = rot @ torch.diag_embed(scales * scales) @ rot.transpose(1, 2)
    ys, xs = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    pix = torch.stack([xs, ys], dim=-1).reshape(-1, 2).to(f64) + 0.5  # [HW, 2]
    pix_tile = torch.div(pix.long(), ts, rounding_mode="floor")  # [HW, 2] (tx, ty)

    cams = []
    for b in range(B):
        Rw, t = views[b, :3, :3], views[b, :3, 3]
        fx, fy, cx, cy = Ks[b, 0, 0], Ks[b, 1, 1], Ks[b, 0, 2], Ks[b, 1, 2]
        p = means @ Rw.T + t
        z = p[:, 2]
        visible = (z >= inp.near_plane) & (z <= inp.far_plane)
        zs = torch.where(visible, z, torch.ones_like(z))
        limx = (-(cx / fx) - 0.15 * W / fx, (W - cx) / fx + 0.15 * W / fx)
        limy = (-(cy / fy) - 0.15 * H / fy, (H - cy) / fy + 0.15 * H / fy)
        u = torch.minimum(torch.maximum(p[:, 0] / zs, limx[0]), limx[1])
        v = torch.minimum(torch.maximum(p[:, 1] / zs, limy[0]), limy[1])
        J = torch.zeros(N, 2, 3, dtype=f64, device=dev)
        J[:, 0, 0] = fx / zs
        J[:, 0, 2] = -fx * u / zs
        J[:, 1, 1] = fy / zs
        J[:, 1, 2] = -fy * v / zs
        cov_raw = J @ Rw @ cov3 @ Rw.T @ J.transpose(1, 2)
        cov2 = cov_raw + s.eps2d * torch.eye(2, dtype=f64, device=dev)
        det2 = torch.linalg.det(cov2)
        visible = visible & (det2 > 0)
        cov2 = torch.where(visible[:, None, None], cov2, torch.eye(2, dtype=f64, device=dev))
        conic = torch.linalg.inv(cov2)
        opac = opac_all
        if s.antialiased:
            opac = opac * torch.sqrt(torch.clamp_min(torch.linalg.det(cov_raw) / torch.linalg.det(cov2), 0.0))
        m2d = torch.stack([fx * p[:, 0] / zs + cx, fy * p[:, 1] / zs + cy], dim=-1)

        with torch.no_grad():
            lam = torch.linalg.eigvalsh(cov2)[:, -1]
            if s.radius_mode == "3sigma":
                r = torch.ceil(3.0 * torch.sqrt(lam))
            else:
                r = torch.ceil(torch.sqrt(2.0 * lam * torch.log(torch.clamp_min(opac / s.alpha_min, 1.0))))
            mx, my = m2d[:, 0], m2d[:, 1]
            keep = visible & (r > 0) & (r > s.radius_clip)
            keep &= (mx + r > 0) & (mx - r < W) & (my + r > 0) & (my - r < H)
            r = torch.where(keep, r, torch.zeros_like(r))
            x0 = torch.floor((mx - r) / ts).clamp(0, tiles_x)
            x1 = torch.ceil((mx + r) / ts).clamp(0, tiles_x)
            y0 = torch.floor((my - r) / ts).clamp(0, tiles_y)
            y1 = torch.ceil((my + r) / ts).clamp(0, tiles_y)
            ptx, pty = pix_tile[:, 0:1].to(f64), pix_tile[:, 1:2].to(f64)
            footprint = keep[None] & (ptx >= x0[None]) & (ptx < x1[None]) & (pty >= y0[None]) & (pty < y1[None])
            order = torch.argsort(torch.where(keep, z, torch.full_like(z, math.inf)), stable=True)
            order = order[: int(keep.sum())]

        cams.append(dict(m2d=m2d, conic=conic, opac=opac, r=r, z=z, footprint=footprint, order=order))

    means2d = torch.stack([c["m2d"] for c in cams])  # [B, N, 2]; the images are computed from it
    if means2d.requires_grad:
        means2d.retain_grad()
    out_c, out_a = [], []
    for b, cam in enumerate(cams):
        Rw, t = views[b, :3, :3], views[b, :3, 3]
        m2d, conic, opac, footprint = means2d[b], cam["conic"], cam["opac"], cam["footprint"]
        if sh_degree is not None:
            campos = -Rw.T @ t
            basis = sh_basis(sh_degree, means - campos)
            col = torch.clamp_min(torch.einsum("nk,nkc->nc", basis, feats[:, : basis.shape[-1], :]) + 0.5, 0.0)
        else:
            col = feats

        d = pix[:, None, :] - m2d[None, :, :]  # [HW, N, 2]
        power = -0.5 * torch.einsum("pni,nij,pnj->pn", d, conic, d)
        alpha = torch.clamp(opac[None, :] * torch.exp(power), max=s.alpha_max)
        ok = footprint & (power <= 0) & (alpha >= s.alpha_min)

        T = torch.ones(H * W, dtype=f64, device=dev)
        done = torch.zeros(H * W, dtype=torch.bool, device=dev)
        acc = torch.zeros(H * W, col.shape[-1], dtype=f64, device=dev)
        for i in cam["order"].tolist():
            a_i = alpha[:, i]
            live = ok[:, i] & ~done
            next_t = T * (1.0 - a_i)
            stop = live & (next_t < s.transmittance_min)
            done = done | stop
            comp = live & ~stop
            acc = acc + torch.where(comp, a_i * T, torch.zeros_like(T))[:, None] * col[i][None, :]
            T = torch.where(comp, next_t, T)
        if inp.backgrounds is not None:
            acc = acc + T[:, None] * inp.backgrounds[b].to(f64)[None, :]
        out_c.append(acc.reshape(H, W, -1))
        out_a.append((1.0 - T).reshape(H, W, 1))

    meta = {
        "means2d": means2d,
        "radii": torch.stack([c["r"].to(torch.int32) for c in cams]),
        "depths": torch.stack([c["z"] for c in cams]),
        "conics": torch.stack([c["conic"].reshape(-1, 4)[:, [0, 1, 3]] for c in cams]),
        "backend": "reference",
    }
    return torch.stack(out_c), torch.stack(out_a), meta
