"""``gsplat`` backend: adapter for ``gsplat.rasterization`` (gsplat 1.5.3, CUDA only).

Argument mapping: ``eps2d``, ``tile_size``, ``near_plane``/``far_plane``, ``radius_clip``
and ``sh_degree`` are passed through; ``antialiased`` → ``rasterize_mode="antialiased"``;
``packed=False`` so that meta tensors are dense ``[B, N, ...]``. The background is blended
here (``color + (1 - alpha)·background``) so its gradient is available. Meta: gsplat's
per-axis ``radii [B,N,2]`` become ``max`` over the axes, ``tiles_per_gauss`` →
``tiles_touched``, ``len(isect_ids)`` → ``n_intersections``; gsplat's own meta dictionary is
kept under ``meta["native"]``.

Known differences from the ``torch``/``cpu`` semantics (fixed inside gsplat's CUDA kernels,
not configurable): alpha is clamped at 0.999 (not ``alpha_max``), a pixel stops when
``T <= 1e-4``, ``alpha_min`` is 1/255, and the footprint is the per-axis box of an
opacity-aware 3.33σ ellipse whatever ``radius_mode`` says. Images agree with the other
backends to ~1e-3 with default settings.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from gstalk.errors import DependencyError, UsageError
from gstalk.raster.pipeline import attach_to_graph
from gstalk.raster.validation import RasterInputs

INSTALL_HINT = "pip install 'gstalk[cuda]' (gsplat 1.5.3) on a machine with an NVIDIA GPU"


class GsplatBackend:
    """gsplat's fused CUDA rasterizer (fast training on NVIDIA GPUs)."""

    name = "gsplat"

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        if importlib.util.find_spec("gsplat") is None:
            return f"gsplat is not installed ({INSTALL_HINT})"
        if not torch.cuda.is_available():
            return "no CUDA device is available (gsplat runs on NVIDIA GPUs only)"
        if device is not None and device.type != "cuda":
            return f"gsplat needs CUDA tensors, got tensors on {device}"
        return None

    def rasterize(self, inp: RasterInputs) -> tuple[Tensor, Tensor, dict]:
        from gstalk.raster.backends import working_backends_text

        reason = self.unavailable_reason(inp.device)
        if reason is not None:
            raise DependencyError(
                f"rasterizer backend 'gsplat' is unavailable: {reason}.",
                hint=f"{INSTALL_HINT}, or use a working backend: {working_backends_text(inp.device)}.",
            )
        if inp.means.dtype != torch.float32:
            raise UsageError(f"the 'gsplat' backend needs float32 tensors, got {inp.means.dtype}.")
        if inp.n_gaussians == 0:  # nothing to draw; gsplat's kernels do not accept N = 0
            from gstalk.raster.backends import get_backend

            colors, alphas, meta = get_backend("torch").rasterize(inp)
            meta["backend"] = self.name
            return colors, alphas, meta
        try:
            import gsplat
        except ImportError as exc:  # installed but broken (e.g. CUDA mismatch)
            raise DependencyError(f"importing gsplat failed: {exc}", hint=INSTALL_HINT) from exc

        s = inp.settings
        colors, alphas, native = gsplat.rasterization(
            inp.means, inp.quats, inp.scales, inp.opacities, inp.colors, inp.viewmats, inp.Ks,
            inp.width, inp.height,
            near_plane=inp.near_plane, far_plane=inp.far_plane, radius_clip=s.radius_clip, eps2d=s.eps2d,
            sh_degree=inp.sh_degree, packed=False, tile_size=s.tile_size, backgrounds=None,
            render_mode="RGB", rasterize_mode="antialiased" if s.antialiased else "classic",
        )  # fmt: skip
        trans = 1.0 - alphas[..., 0]
        colors, trans = attach_to_graph(colors, trans, inp)
        if inp.backgrounds is not None:
            colors = colors + trans[..., None] * inp.backgrounds[:, None, None, :]
        radii = native["radii"]
        if radii.dim() == 3:  # gsplat >= 1.5: per-axis radii
            radii = radii.max(dim=-1).values
        meta = {
            "means2d": native["means2d"],
            "radii": radii.to(torch.int32),
            "depths": native["depths"],
            "conics": native["conics"],
            "opacities": native.get("opacities"),
            "tiles_touched": native["tiles_per_gauss"].to(torch.int32),
            "n_intersections": int(native["isect_ids"].numel()),
            "tile_size": s.tile_size,
            "backend": self.name,
            "native": native,
        }
        return colors, 1.0 - trans[..., None], meta
