"""3D Gaussian Splatting rasterizer with interchangeable backends.

Public API::

    from gstalk.raster import rasterize, RasterSettings, available_backends, get_backend
    colors, alphas, meta = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H)

Backends: ``torch`` (pure PyTorch reference, any device), ``cpu`` (C++/OpenMP, built on
first use), ``gsplat`` and ``inria`` (CUDA libraries, optional). Importing this package
imports no backend library and compiles nothing. See ``docs/raster.md``.
"""

from gstalk.raster.api import rasterize
from gstalk.raster.backends import available_backends, backend_names, get_backend, register_backend
from gstalk.raster.settings import RasterSettings

__all__ = [
    "RasterSettings",
    "available_backends",
    "backend_names",
    "get_backend",
    "rasterize",
    "register_backend",
]
