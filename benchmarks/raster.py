"""Benchmark the gstalk rasterizer backends (thin wrapper over gstalk.raster.bench).

Usage::

    python benchmarks/raster.py            # 256²/10k, 512²/10k, 512²/50k; torch, cpu (+CUDA backends)
    python benchmarks/raster.py --quick    # fewer repeats, < 2 min on 2 cores
    python benchmarks/raster.py --json     # JSON rows {width, height, n, backend, fwd_ms, fwd_bwd_ms, fps}
    python benchmarks/raster.py --sizes 128x128x2000 --backends cpu
"""

from __future__ import annotations

import sys

from gstalk.raster.bench import main

if __name__ == "__main__":
    sys.exit(main())
