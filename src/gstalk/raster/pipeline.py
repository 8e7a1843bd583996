"""Stages shared by the ``torch`` and ``cpu`` backends: colours/SH, projection, binning,
and the final background blend + meta dictionary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gstalk.raster.binning import Bins, bin_gaussians
from gstalk.raster.projection import Projection, camera_centers, project_gaussians
from gstalk.raster.sh import sh_to_color
from gstalk.raster.validation import RasterInputs


@dataclass
class Prepared:
    """Screen-space Gaussians ready for compositing.

    Attributes:
        proj: per-camera projection (``[B, N, ...]`` tensors).
        colors: ``[N, C]`` shared by all cameras (``shared_colors``) or ``[B, N, C]``
            per camera (SH evaluated per view direction).
        shared_colors: whether ``colors`` is ``[N, C]``.
        bins: sorted tile lists.
    """

    proj: Projection
    colors: Tensor
    shared_colors: bool
    bins: Bins


def prepare(
    inp: RasterInputs,
    binner: Callable[..., Bins] = bin_gaussians,
    projector: Callable[..., Projection] = project_gaussians,
) -> Prepared:
    """Project, evaluate SH (if ``sh_degree`` is set) and bin the Gaussians.

    Args:
        inp: validated inputs.
        binner: :func:`gstalk.raster.binning.bin_gaussians` or a drop-in replacement with
            the same result (the ``cpu`` backend passes its C++ binning).
        projector: :func:`gstalk.raster.projection.project_gaussians` or a drop-in
            replacement (the ``cpu`` backend passes its fused C++ projection when no
            gradient is needed).
    """
    proj = projector(
        inp.means, inp.quats, inp.scales, inp.opacities, inp.viewmats, inp.Ks,
        inp.width, inp.height, inp.near_plane, inp.far_plane, inp.settings,
    )  # fmt: skip
    if inp.sh_degree is not None:
        colors = sh_to_color(inp.sh_degree, inp.colors, inp.means, camera_centers(inp.viewmats))
        shared = False
    else:
        colors, shared = inp.colors, True
    bins = binner(proj.means2d, proj.radii, proj.depths, inp.width, inp.height, inp.settings.tile_size)
    return Prepared(proj, colors, shared, bins)


def per_camera_colors(prep: Prepared, n_cameras: int) -> Tensor:
    """Colours as ``[B·N, C]`` (index ``b·N + n``)."""
    cols = prep.colors
    if prep.shared_colors:
        cols = cols[None].expand(n_cameras, -1, -1)
    return cols.reshape(-1, cols.shape[-1])


def finish(
    color: Tensor, trans: Tensor, inp: RasterInputs, prep: Prepared, backend: str
) -> tuple[Tensor, Tensor, dict]:
    """Blend the background and assemble the outputs of :func:`gstalk.raster.rasterize`.

    Args:
        color: ``[B, H, W, C]`` colour composited over black.
        trans: ``[B, H, W]`` final transmittance ``T``.

    Returns:
        ``(color + T·background [B,H,W,C], 1 - T [B,H,W,1], meta)``.
    """
    color, trans = attach_to_graph(color, trans, inp)
    if inp.backgrounds is not None:
        color = color + trans[..., None] * inp.backgrounds[:, None, None, :]
    alpha = 1.0 - trans[..., None]
    return color, alpha, make_meta(prep.proj, prep.bins, backend)


def attach_to_graph(color: Tensor, trans: Tensor, inp: RasterInputs) -> tuple[Tensor, Tensor]:
    """Keep outputs differentiable (zero gradients) when no Gaussian is visible.

    Without this, a frame where everything is culled would make ``loss.backward()`` fail.
    """
    if not torch.is_grad_enabled() or color.requires_grad:
        return color, trans
    srcs = [t for t in (inp.means, inp.quats, inp.scales, inp.opacities, inp.colors) if t.requires_grad]
    if not srcs:
        return color, trans
    zero = sum(t.reshape(-1)[:0].sum() for t in srcs)  # exactly 0, connected to the inputs
    return color + zero, trans + zero


def make_meta(proj: Projection, bins: Bins, backend: str) -> dict:
    """The meta dictionary documented in :func:`gstalk.raster.rasterize`."""
    return {
        "means2d": proj.means2d,
        "radii": proj.radii,
        "depths": proj.depths,
        "conics": proj.conics,
        "opacities": proj.opacities,
        "tiles_touched": bins.tiles_touched,
        "n_intersections": int(bins.n_intersections),
        "tile_offsets": bins.tile_offsets,
        "flatten_ids": bins.flatten_ids,
        "tile_size": bins.tile_size,
        "backend": backend,
    }


def empty_like_outputs(inp: RasterInputs) -> tuple[Tensor, Tensor]:
    """Black colour and unit transmittance images (used when nothing is visible)."""
    B, H, W, C = inp.n_cameras, inp.height, inp.width, inp.n_channels
    z = torch.zeros(B, H, W, C, dtype=inp.means.dtype, device=inp.device)
    return z, torch.ones(B, H, W, dtype=inp.means.dtype, device=inp.device)
