"""Argument checking for :func:`gstalk.raster.rasterize` (done once, at entry)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gstalk.errors import UsageError
from gstalk.raster.settings import RasterSettings
from gstalk.raster.sh import MAX_SH_DEGREE, num_sh_bases


@dataclass
class RasterInputs:
    """Validated arguments of one rasterize call (B cameras, N Gaussians, C channels).

    Tensors keep the caller's dtype (float32, or float64 for the ``torch`` backend) and
    device; ``backgrounds`` is ``[B, C]`` or None; ``colors`` is ``[N, C]`` or, when
    ``sh_degree`` is set, ``[N, K, 3]`` SH coefficients (then C = 3).
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor
    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int
    near_plane: float
    far_plane: float
    sh_degree: int | None
    backgrounds: Tensor | None
    settings: RasterSettings

    @property
    def n_cameras(self) -> int:
        return self.viewmats.shape[0]

    @property
    def n_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def n_channels(self) -> int:
        return 3 if self.sh_degree is not None else self.colors.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.means.device


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise UsageError(f"rasterize: {name} must be a torch.Tensor, got {type(t).__name__}.")
    return t


def validate_inputs(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    sh_degree: int | None,
    backgrounds: Tensor | None,
    settings: RasterSettings | None,
) -> RasterInputs:
    """Check shapes, dtypes, devices and scalar arguments; see :func:`gstalk.raster.rasterize`.

    Raises:
        UsageError: naming the argument, the expected shape and the shape received.
    """
    named = {"means": means, "quats": quats, "scales": scales, "opacities": opacities,
             "colors": colors, "viewmats": viewmats, "Ks": Ks}  # fmt: skip
    for k, v in named.items():
        _tensor(k, v)
    if backgrounds is not None:
        _tensor("backgrounds", backgrounds)
    if settings is None:
        settings = RasterSettings()
    elif not isinstance(settings, RasterSettings):
        raise UsageError(f"rasterize: settings must be a RasterSettings, got {type(settings).__name__}.")

    if means.dim() != 2 or means.shape[1] != 3:
        raise UsageError(f"rasterize: means must be [N,3], got {_shape(means)}.")
    N = means.shape[0]
    for name, t, tail in (("quats", quats, (4,)), ("scales", scales, (3,)), ("opacities", opacities, ())):
        if tuple(t.shape) != (N, *tail):
            want = "[" + ",".join(["N"] + [str(s) for s in tail]) + "]"
            raise UsageError(f"rasterize: {name} must be {want} with N={N} (from means), got {_shape(t)}.")
    if viewmats.dim() != 3 or tuple(viewmats.shape[1:]) != (4, 4) or viewmats.shape[0] < 1:
        raise UsageError(f"rasterize: viewmats must be [B,4,4] with B>=1, got {_shape(viewmats)}.")
    B = viewmats.shape[0]
    if tuple(Ks.shape) != (B, 3, 3):
        raise UsageError(f"rasterize: Ks must be [B,3,3] with B={B} (from viewmats), got {_shape(Ks)}.")

    if sh_degree is None:
        if colors.dim() != 2 or colors.shape[0] != N or colors.shape[1] < 1:
            raise UsageError(
                f"rasterize: colors must be [N,C] with N={N}, C>=1 (or [N,K,3] SH coefficients with "
                f"sh_degree set), got {_shape(colors)}."
            )
        C = colors.shape[1]
    else:
        if isinstance(sh_degree, bool) or not isinstance(sh_degree, int) or not 0 <= sh_degree <= MAX_SH_DEGREE:
            raise UsageError(f"rasterize: sh_degree must be None or an int in 0..{MAX_SH_DEGREE}, got {sh_degree!r}.")
        K = num_sh_bases(sh_degree)
        if colors.dim() != 3 or colors.shape[0] != N or colors.shape[2] != 3 or colors.shape[1] < K:
            raise UsageError(
                f"rasterize: with sh_degree={sh_degree}, colors must be SH coefficients [N,K,3] with N={N}, "
                f"K>={K}, got {_shape(colors)}."
            )
        C = 3
    if backgrounds is not None:
        if backgrounds.dim() == 1 and backgrounds.shape[0] == C:
            backgrounds = backgrounds[None].expand(B, C)
        elif tuple(backgrounds.shape) != (B, C):
            raise UsageError(f"rasterize: backgrounds must be [B,C]=[{B},{C}] (or [C]), got {_shape(backgrounds)}.")

    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"rasterize: {name} must be a positive int (pixels), got {v!r}.")
    near_plane, far_plane = float(near_plane), float(far_plane)
    if not (near_plane > 0.0 and far_plane > near_plane):
        raise UsageError(f"rasterize: need 0 < near_plane < far_plane, got near={near_plane}, far={far_plane}.")

    tensors = dict(named, backgrounds=backgrounds) if backgrounds is not None else named
    dtype, device = means.dtype, means.device
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"rasterize: means must be float32 (or float64), got {dtype}.")
    for k, v in tensors.items():
        if v.dtype != dtype:
            raise UsageError(f"rasterize: {k} has dtype {v.dtype} but means has {dtype}; all tensors must share it.")
        if v.device != device:
            raise UsageError(f"rasterize: {k} is on {v.device} but means is on {device}; all tensors must share it.")
    return RasterInputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                        near_plane, far_plane, sh_degree, backgrounds, settings)  # fmt: skip
