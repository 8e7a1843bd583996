"""Tile binning by the C++ library: same result as :func:`gstalk.raster.binning.bin_gaussians`.

The vectorised torch version spends most of its time gathering and sorting one 64-bit key
per intersection (≈0.7 M at 512²/50k). Here two serial C++ passes count the intersections
per tile, then sort the Gaussians (not the intersections) of each camera by depth (stable
radix sort) and append each one to its tiles in that order, which yields the same
front-to-back lists (ties: lower Gaussian index first) in a few milliseconds without any
multi-threaded torch op. Equality with the torch binning is checked by the tests.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from gstalk.raster.binning import Bins
from gstalk.raster.build import load_library


def _p(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@torch.no_grad()
def bin_gaussians_cpu(means2d: Tensor, radii: Tensor, depths: Tensor, width: int, height: int, tile_size: int) -> Bins:
    """C++ tile binning (CPU tensors); arguments and result as :func:`bin_gaussians`.

    Raises:
        DependencyError: the C++ library cannot be built.
    """
    lib = load_library()
    B, N = radii.shape
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tiles_x * tiles_y
    m2d = means2d.detach().to(torch.float32).reshape(B * N, 2).contiguous()
    rad = radii.to(torch.int32).reshape(B * N).contiguous()
    tiles_touched = torch.empty(B * N, dtype=torch.int32)
    offsets = torch.empty(B * n_tiles + 1, dtype=torch.int64)
    lib.gstalk_raster_bin_count(B, N, tile_size, tiles_x, tiles_y, _p(m2d), _p(rad), _p(tiles_touched), _p(offsets))
    total = int(offsets[-1])
    if total == 0:
        ids = torch.zeros(0, dtype=torch.int32)
    else:
        dep = depths.detach().to(torch.float32).reshape(B * N).contiguous()
        ids = torch.empty(total, dtype=torch.int32)
        lib.gstalk_raster_bin_fill(B, N, tile_size, tiles_x, tiles_y, _p(m2d), _p(rad), _p(dep), _p(offsets), _p(ids))
    return Bins(tiles_x, tiles_y, tile_size, tiles_touched.reshape(B, N), ids, offsets, total)
