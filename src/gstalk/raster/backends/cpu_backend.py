"""``cpu`` backend: torch projection/SH/binning + C++/OpenMP compositing and backward."""

from __future__ import annotations

import torch
from torch import Tensor

from gstalk.errors import UsageError
from gstalk.raster import build
from gstalk.raster.binning_cpu import bin_gaussians_cpu
from gstalk.raster.composite_cpu import composite_tiles_cpu
from gstalk.raster.pipeline import finish, prepare
from gstalk.raster.projection import project_gaussians
from gstalk.raster.projection_cpu import project_gaussians_cpu
from gstalk.raster.validation import RasterInputs


class CpuBackend:
    """Fast CPU rasterizer; needs a C++ compiler with OpenMP on first use (see build.py).

    Inputs must be float32 CPU tensors. Uses ``torch.get_num_threads()`` threads. Binning
    always runs in C++; the projection runs in torch autograd when a gradient is needed
    and in fused C++ otherwise (same formulas).
    """

    name = "cpu"

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        if device is not None and device.type != "cpu":
            return f"the 'cpu' backend needs CPU tensors (got {device})"
        return build.unavailable_reason()

    def rasterize(self, inp: RasterInputs) -> tuple[Tensor, Tensor, dict]:
        if inp.device.type != "cpu":
            raise UsageError(f"the 'cpu' backend needs CPU tensors, got tensors on {inp.device}; use backend='auto'.")
        if inp.means.dtype != torch.float32:
            raise UsageError(f"the 'cpu' backend needs float32 tensors, got {inp.means.dtype}; use backend='torch'.")
        build.load_library()  # fail (DependencyError) before doing any work
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (inp.means, inp.quats, inp.scales, inp.opacities, inp.colors)
        )
        projector = project_gaussians if needs_grad else project_gaussians_cpu
        prep = prepare(inp, binner=bin_gaussians_cpu, projector=projector)
        B, N = inp.n_cameras, inp.n_gaussians
        p = prep.proj
        colors = prep.colors if prep.shared_colors else prep.colors.reshape(B * N, -1)
        color, trans = composite_tiles_cpu(
            p.means2d.reshape(-1, 2), p.conics.reshape(-1, 3), p.opacities.reshape(-1), colors,
            prep.shared_colors, prep.bins, B, N, inp.width, inp.height, inp.settings,
        )  # fmt: skip
        return finish(color, trans, inp, prep, self.name)
