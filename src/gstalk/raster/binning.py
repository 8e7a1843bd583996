"""Tile binning: which Gaussians touch which screen tile, sorted front to back (torch).

Every visible (camera b, Gaussian n) pair produces one *intersection* per tile that its
square bounding box ``mean ± radius`` touches: tiles ``tx`` with
``floor((x - r)/ts) <= tx < ceil((x + r)/ts)`` clamped to the image (same for y). Each
intersection gets the 64-bit key ``(b·n_tiles + tile_id) << 32 | depth_order``; one stable
sort groups intersections by (camera, tile) and orders each group by increasing depth
(ties: lower Gaussian index first). A Gaussian therefore only affects pixels of the tiles
its bounding box touches, as in 3DGS and gsplat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Bins:
    """Result of :func:`bin_gaussians` for B cameras and N Gaussians (G = B·N).

    Attributes:
        tiles_x, tiles_y: tile grid size, ``ceil(W/ts)`` × ``ceil(H/ts)``.
        tile_size: tile side in pixels.
        tiles_touched: ``[B, N]`` int32 number of tiles each Gaussian touches (0 if culled).
        flatten_ids: ``[M]`` int32 index ``b·N + n`` of each sorted intersection.
        tile_offsets: ``[B·tiles_y·tiles_x + 1]`` int64; the intersections of global tile
            ``t = b·tiles_y·tiles_x + ty·tiles_x + tx`` are
            ``flatten_ids[tile_offsets[t]:tile_offsets[t+1]]``, front to back.
        n_intersections: M.
    """

    tiles_x: int
    tiles_y: int
    tile_size: int
    tiles_touched: Tensor
    flatten_ids: Tensor
    tile_offsets: Tensor
    n_intersections: int


def tile_rects(means2d: Tensor, radii: Tensor, tile_size: int, tiles_x: int, tiles_y: int) -> Tensor:
    """Half-open tile rectangles ``[x0, x1) × [y0, y1)`` of the Gaussians' bounding boxes.

    Args:
        means2d: ``[..., 2]`` pixel coordinates.
        radii: ``[...]`` integer radii in pixels (0 = culled, gives an empty rectangle).

    Returns:
        ``[..., 4]`` int64 ``(x0, x1, y0, y1)`` clamped to the tile grid.
    """
    r = radii.to(means2d.dtype)
    mx, my = means2d[..., 0], means2d[..., 1]
    x0 = torch.floor((mx - r) / tile_size).clamp(0, tiles_x)
    x1 = torch.ceil((mx + r) / tile_size).clamp(0, tiles_x)
    y0 = torch.floor((my - r) / tile_size).clamp(0, tiles_y)
    y1 = torch.ceil((my + r) / tile_size).clamp(0, tiles_y)
    rect = torch.stack([x0, x1, y0, y1], dim=-1).to(torch.int64)
    culled = (radii <= 0)[..., None]
    return torch.where(culled, torch.zeros_like(rect), rect)


def _depth_order(depths: Tensor, visible: Tensor) -> Tensor:
    """Non-negative int64 per (b, n) that sorts like the depth (fits in 31 bits)."""
    if depths.dtype == torch.float32:
        # Positive IEEE floats compare like their bit patterns.
        d = torch.where(visible, depths, torch.ones_like(depths)).clamp_min(0.0)
        return d.contiguous().view(torch.int32).to(torch.int64)
    order = torch.argsort(depths, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(depths.shape[-1], device=depths.device).expand_as(order))
    return rank


@torch.no_grad()
def bin_gaussians(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int) -> Bins:
    """Build the sorted per-tile intersection lists (vectorised, one sort).

    Args:
        means2d: ``[B, N, 2]`` pixel coordinates (gradient ignored).
        radii: ``[B, N]`` int32 radii, 0 = culled.
        depths: ``[B, N]`` camera z (metres), positive for visible Gaussians.
        width, height: image size in pixels.
        tile_size: tile side in pixels.

    Returns:
        :class:`Bins`.
    """
    device = means2d.device
    B, N = radii.shape
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tiles_x * tiles_y
    rect = tile_rects(means2d.detach(), radii, tile_size, tiles_x, tiles_y).reshape(B * N, 4)
    wx = rect[:, 1] - rect[:, 0]
    counts = wx * (rect[:, 3] - rect[:, 2])  # [B*N]
    tiles_touched = counts.reshape(B, N).to(torch.int32)
    total = int(counts.sum())
    if total == 0:
        return Bins(tiles_x, tiles_y, tile_size, tiles_touched,
                    torch.zeros(0, dtype=torch.int32, device=device),
                    torch.zeros(B * n_tiles + 1, dtype=torch.int64, device=device), 0)  # fmt: skip

    ids = torch.repeat_interleave(torch.arange(B * N, device=device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=device) - starts[ids]
    wx_i = wx[ids]
    tx = rect[ids, 0] + local % wx_i
    ty = rect[ids, 2] + torch.div(local, wx_i, rounding_mode="floor")
    cam = torch.div(ids, N, rounding_mode="floor")
    tile_gid = cam * n_tiles + ty * tiles_x + tx

    order_val = _depth_order(depths.detach(), radii > 0).reshape(B * N)
    keys = (tile_gid << 32) | order_val[ids]
    _, perm = torch.sort(keys, stable=True)
    flatten_ids = ids[perm].to(torch.int32)
    per_tile = torch.bincount(tile_gid, minlength=B * n_tiles)
    tile_offsets = torch.zeros(B * n_tiles + 1, dtype=torch.int64, device=device)
    torch.cumsum(per_tile, 0, out=tile_offsets[1:])
    return Bins(tiles_x, tiles_y, tile_size, tiles_touched, flatten_ids, tile_offsets, total)
