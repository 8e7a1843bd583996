"""Front-to-back alpha compositing of binned Gaussians in pure torch autograd.

Readable reference of the tile rasterizer (3DGS Eq. 2-3):
``C = Σ_i c_i α_i T_i`` with ``T_i = Π_{j<i} (1 - α_j)`` and
``α_i = min(alpha_max, o_i · exp(-½ dᵀ Σ'⁻¹ d))``, ``d`` = pixel centre − 2D mean.
Tiles are processed in chunks; each tile's front-to-back list is padded to the chunk's
longest list and evaluated for all pixels at once. Skipped entries (padding, ``power > 0``,
``α < alpha_min``) get α = 0. The early stop (a pixel stops before the Gaussian that would
bring its transmittance below ``transmittance_min``) is a mask: transmittance is monotone,
so "stopped" ⇔ the inclusive cumulative product of ``1 - α`` is below the threshold.
When gradients are needed each chunk runs under activation checkpointing, so memory stays
bounded by one chunk's temporaries (the chunk is recomputed during backward).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gstalk.raster.binning import Bins
from gstalk.raster.settings import RasterSettings

#: elements per [tiles, pixels, gaussians] temporary in one chunk (memory/speed trade-off)
CHUNK_ELEMENTS = 1 << 22


def _composite_chunk(
    px: Tensor,
    py: Tensor,
    inside: Tensor,
    lmask: Tensor,
    gid: Tensor,
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    settings: RasterSettings,
) -> tuple[Tensor, Tensor]:
    """Composite ``nt`` tiles whose (padded) lists are ``gid [nt, L]`` (valid where ``lmask``).

    ``px, py, inside``: ``[nt, P]`` pixel centres and in-image mask. Returns the colour over
    black ``[nt, P, C]`` and the final transmittance ``[nt, P]``.
    """
    dx = px[:, :, None] - means2d[gid, 0][:, None, :]  # [nt, P, L]
    dy = py[:, :, None] - means2d[gid, 1][:, None, :]
    con = conics[gid]
    a, b, c = con[..., 0][:, None, :], con[..., 1][:, None, :], con[..., 2][:, None, :]
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
    alpha = torch.clamp(opacities[gid][:, None, :] * torch.exp(power), max=settings.alpha_max)
    valid = lmask[:, None, :] & inside[:, :, None] & (power <= 0) & (alpha >= settings.alpha_min)
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
    with torch.no_grad():  # early stop: T after the Gaussian would fall below transmittance_min
        keep = torch.cumprod(1.0 - alpha, dim=-1) >= settings.transmittance_min
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(1.0 - alpha, dim=-1)  # transmittance after each Gaussian
    trans_before = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], dim=-1)
    weights = alpha * trans_before  # α_i T_i
    return torch.einsum("npl,nlc->npc", weights, colors[gid]), trans[..., -1]


def composite_tiles(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    bins: Bins,
    n_images: int,
    width: int,
    height: int,
    settings: RasterSettings,
) -> tuple[Tensor, Tensor]:
    """Composite the binned Gaussians of every tile, front to back, without background.

    Args:
        means2d: ``[G, 2]`` pixel coordinates, G = B·N (index ``b·N + n``).
        conics: ``[G, 3]`` inverse 2D covariances ``(a, b, c)``.
        opacities: ``[G]`` (compensated) opacities.
        colors: ``[G, C]`` per-camera colours/features.
        bins: tile lists from :func:`gstalk.raster.binning.bin_gaussians`.
        n_images: B.
        width, height: image size in pixels.
        settings: alpha/transmittance thresholds.

    Returns:
        ``(color [B, H, W, C], transmittance [B, H, W])``: colour composited over a black
        background and the final transmittance ``T`` (render alpha = ``1 - T``).
    """
    device, dtype = means2d.device, means2d.dtype
    C = colors.shape[-1]
    ts, tx_n, ty_n = bins.tile_size, bins.tiles_x, bins.tiles_y
    n_tiles = tx_n * ty_n
    P = ts * ts
    offsets = bins.tile_offsets
    counts = offsets[1:] - offsets[:-1]
    tile_ids = torch.nonzero(counts > 0).flatten()
    tile_ids = tile_ids[torch.argsort(counts[tile_ids], descending=True, stable=True)]
    counts_sorted = counts[tile_ids].tolist()

    local = torch.arange(P, device=device)
    lx = (local % ts).to(dtype) + 0.5
    ly = torch.div(local, ts, rounding_mode="floor").to(dtype) + 0.5

    out_tiles, out_trans, done_ids = [], [], []
    start = 0
    while start < len(counts_sorted):
        L = counts_sorted[start]
        nt = max(1, min(len(counts_sorted) - start, CHUNK_ELEMENTS // (P * L)))
        tid = tile_ids[start : start + nt]
        start += nt
        t_in_img = tid % n_tiles
        px = (t_in_img % tx_n).to(dtype)[:, None] * ts + lx[None, :]  # [nt, P]
        py = torch.div(t_in_img, tx_n, rounding_mode="floor").to(dtype)[:, None] * ts + ly[None, :]
        inside = (px < width) & (py < height)

        ar = torch.arange(L, device=device)
        idx = offsets[tid][:, None] + ar[None, :]  # [nt, L]
        lmask = ar[None, :] < counts[tid][:, None]
        gid = bins.flatten_ids[idx.clamp(max=bins.n_intersections - 1)].long()
        args = (px, py, inside, lmask, gid, means2d, conics, opacities, colors)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[5:]):
            # recompute the chunk in backward instead of keeping its [nt, P, L] temporaries
            out, trans_last = checkpoint(_composite_chunk, *args, settings, use_reentrant=False)
        else:
            out, trans_last = _composite_chunk(*args, settings)
        out_tiles.append(out)
        out_trans.append(trans_last)
        done_ids.append(tid)

    B = n_images
    img = torch.zeros(B * n_tiles, P, C, device=device, dtype=dtype)
    trans_img = torch.ones(B * n_tiles, P, device=device, dtype=dtype)
    if done_ids:
        ids = torch.cat(done_ids)
        img = img.index_put((ids,), torch.cat(out_tiles))
        trans_img = trans_img.index_put((ids,), torch.cat(out_trans))
    img = img.reshape(B, ty_n, tx_n, ts, ts, C).permute(0, 1, 3, 2, 4, 5).reshape(B, ty_n * ts, tx_n * ts, C)
    trans_img = trans_img.reshape(B, ty_n, tx_n, ts, ts).permute(0, 1, 3, 2, 4).reshape(B, ty_n * ts, tx_n * ts)
    return img[:, :height, :width], trans_img[:, :height, :width]
