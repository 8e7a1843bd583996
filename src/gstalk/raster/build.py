"""Build, cache and load the C++ CPU rasterizer (``csrc/raster_cpu.cpp``).

The kernel is plain C++17 + OpenMP with ``extern "C"`` entry points (no torch headers, so
it compiles in a few seconds). :class:`gstalk.native.NativeLibrary` compiles it on first use
with :func:`torch.utils.cpp_extension.load` into ``$GSTALK_CACHE_DIR`` (default
``~/.cache/gstalk``), under a file lock and with an atomic rename, and loads it with ctypes.
Nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from gstalk.native import NativeLibrary

SOURCE = Path(__file__).resolve().parent / "csrc" / "raster_cpu.cpp"


def _declare(lib: ctypes.CDLL) -> None:
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    geom = [i] * 9
    common = geom + [p, p, p, p, p, p, f, f, f]
    lib.gstalk_raster_forward.argtypes = common + [p, p, p, i]
    lib.gstalk_raster_forward.restype = i
    lib.gstalk_raster_backward.argtypes = common + [p, p, p, p, p, p, p, p, p, i]
    lib.gstalk_raster_backward.restype = i
    lib.gstalk_raster_version.restype = i
    lib.gstalk_raster_project.argtypes = [i] * 4 + [p] * 6 + [f] * 3 + [i, i, f, f] + [p] * 5 + [i]
    lib.gstalk_raster_project.restype = i
    lib.gstalk_raster_bin_count.argtypes = [i] * 5 + [p] * 4
    lib.gstalk_raster_bin_count.restype = i
    lib.gstalk_raster_bin_fill.argtypes = [i] * 5 + [p] * 5  # means2d, radii, depths, offsets, ids
    lib.gstalk_raster_bin_fill.restype = i


RASTER = NativeLibrary(name="gstalk_raster_cpu", source=SOURCE, declare=_declare, description="CPU rasterizer",
                       fallback_hint="pass backend='torch'.")


def load_library() -> ctypes.CDLL:
    """The compiled CPU rasterizer, building it on first use (cached per process).

    Raises:
        DependencyError: it cannot be built or loaded (first compiler error line and the fix);
            the failure is remembered, so later calls fail fast (see :func:`reset`).
    """
    return RASTER.load()


def unavailable_reason() -> str | None:
    """None when the library is (or can be) loaded, else the reason; builds if needed."""
    return RASTER.unavailable_reason()


def is_loaded() -> bool:
    """Whether this process has loaded the compiled library."""
    return RASTER.loaded


def reset() -> None:
    """Forget the cached library/failure (for tests; an already loaded .so stays mapped)."""
    RASTER.reset()
