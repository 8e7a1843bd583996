"""``torch`` backend: pure PyTorch tile rasterizer (CPU or CUDA), the readable reference."""

from __future__ import annotations

import torch
from torch import Tensor

from gstalk.raster.composite_torch import composite_tiles
from gstalk.raster.pipeline import finish, per_camera_colors, prepare
from gstalk.raster.validation import RasterInputs


class TorchBackend:
    """Projection, SH and binning in torch; compositing in torch autograd, chunk of tiles
    by chunk of tiles. Works on any device and in float32 or float64; slow."""

    name = "torch"

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        return None

    def rasterize(self, inp: RasterInputs) -> tuple[Tensor, Tensor, dict]:
        prep = prepare(inp)
        B = inp.n_cameras
        p = prep.proj
        color, trans = composite_tiles(
            p.means2d.reshape(-1, 2), p.conics.reshape(-1, 3), p.opacities.reshape(-1),
            per_camera_colors(prep, B), prep.bins, B, inp.width, inp.height, inp.settings,
        )  # fmt: skip
        return finish(color, trans, inp, prep, self.name)
