"""Front-to-back compositing by the C++/OpenMP kernel, with its hand-written backward.

Same semantics as :mod:`gstalk.raster.composite_torch` (3DGS Eq. 2-3). The backward is the
standard back-to-front 3DGS gradient: starting from the stored final transmittance and
the index of the last composited Gaussian of every pixel, it walks each tile's list in
reverse, recovers ``T_i = T_{i+1} / (1 - α_i)`` and the colour behind,
``R_{i-1} = α_i c_i + (1 - α_i) R_i``, and uses
``∂C/∂α_i = T_i (c_i - R_i)`` and ``∂T_final/∂α_i = -T_final / (1 - α_i)``. A clamped alpha
(``o·G > alpha_max``) passes no gradient to the opacity or the 2D Gaussian. Gradients are
written per intersection and reduced serially, so they are bit-identical for any thread
count.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from gstalk.raster.binning import Bins
from gstalk.raster.build import load_library
from gstalk.raster.settings import RasterSettings


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


#: intersections per extra thread: below this, starting (and waking) OpenMP threads costs
#: more than it saves, especially when other processes compete for the cores
WORK_PER_THREAD = 20_000


def n_threads_for(work_items: int) -> int:
    """Threads for a kernel call: ``torch.get_num_threads()``, fewer for small inputs.

    The results do not depend on it (see the determinism note in the module docstring).
    """
    return max(1, min(torch.get_num_threads(), work_items // WORK_PER_THREAD))


class _CpuComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, tile_offsets, flatten_ids, geom):  # type: ignore[override]
        lib = load_library()
        (B, W, H, ts, tx, ty, N, C, shared, amin, amax, tmin) = geom
        means2d, conics, opacities, colors = _f32(means2d), _f32(conics), _f32(opacities), _f32(colors)
        need_grad = any(ctx.needs_input_grad[:4])
        out = torch.empty(B, H, W, C, dtype=torch.float32)
        trans = torch.empty(B, H, W, dtype=torch.float32)
        last = torch.empty(B, H, W, dtype=torch.int32) if need_grad else None
        lib.gstalk_raster_forward(
            B, W, H, ts, tx, ty, N, C, shared,
            _ptr(means2d), _ptr(conics), _ptr(opacities), _ptr(colors), _ptr(tile_offsets), _ptr(flatten_ids),
            amin, amax, tmin, _ptr(out), _ptr(trans), _ptr(last), n_threads_for(flatten_ids.shape[0]),
        )  # fmt: skip
        if need_grad:
            ctx.save_for_backward(means2d, conics, opacities, colors, tile_offsets, flatten_ids, trans, last)
            ctx.geom = geom
        return out, trans

    @staticmethod
    def backward(ctx, grad_out, grad_trans):  # type: ignore[override]
        lib = load_library()
        means2d, conics, opacities, colors, tile_offsets, flatten_ids, trans, last = ctx.saved_tensors
        (B, W, H, ts, tx, ty, N, C, shared, amin, amax, tmin) = ctx.geom
        grad_out = torch.zeros(B, H, W, C) if grad_out is None else _f32(grad_out)
        grad_trans = torch.zeros(B, H, W) if grad_trans is None else _f32(grad_trans)
        M = flatten_ids.shape[0]
        records = torch.empty(max(M, 1), 6 + C, dtype=torch.float32)
        g_means2d = torch.zeros_like(means2d)
        g_conics = torch.zeros_like(conics)
        g_opac = torch.zeros_like(opacities)
        g_colors = torch.zeros_like(colors)
        lib.gstalk_raster_backward(
            B, W, H, ts, tx, ty, N, C, shared,
            _ptr(means2d), _ptr(conics), _ptr(opacities), _ptr(colors), _ptr(tile_offsets), _ptr(flatten_ids),
            amin, amax, tmin, _ptr(trans), _ptr(last), _ptr(grad_out), _ptr(grad_trans), _ptr(records),
            _ptr(g_means2d), _ptr(g_conics), _ptr(g_opac), _ptr(g_colors), n_threads_for(M),
        )  # fmt: skip
        return g_means2d, g_conics, g_opac, g_colors, None, None, None


def composite_tiles_cpu(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    colors: Tensor,
    colors_shared: bool,
    bins: Bins,
    n_images: int,
    n_per_image: int,
    width: int,
    height: int,
    settings: RasterSettings,
) -> tuple[Tensor, Tensor]:
    """C++ counterpart of :func:`gstalk.raster.composite_torch.composite_tiles`.

    Args:
        means2d: ``[G, 2]`` float32 pixel coordinates (G = B·N).
        conics: ``[G, 3]``; opacities: ``[G]``.
        colors: ``[N, C]`` when ``colors_shared`` (same colour for every camera) else ``[G, C]``.
        bins: tile lists; n_images: B; n_per_image: N.

    Returns:
        ``(color [B, H, W, C] over black, final transmittance [B, H, W])``, float32,
        differentiable w.r.t. means2d, conics, opacities and colors.

    Raises:
        DependencyError: the C++ library cannot be built.
    """
    geom = (
        n_images, width, height, bins.tile_size, bins.tiles_x, bins.tiles_y, n_per_image, colors.shape[-1],
        int(colors_shared), float(settings.alpha_min), float(settings.alpha_max), float(settings.transmittance_min),
    )  # fmt: skip
    offsets = bins.tile_offsets.contiguous()
    ids = bins.flatten_ids.contiguous()
    return _CpuComposite.apply(means2d, conics, opacities, colors, offsets, ids, geom)
