"""The one JSON line ``benchmarks/gpu_check.sh`` ends with, from ``gstalk run --json`` and
``gstalk bench render --json`` outputs.

Usage: python benchmarks/gpu_summary.py RUN.json BENCH.json
       python benchmarks/gpu_summary.py --check-torch   (exit 3 with the fix when torch sees no GPU)

Prints {"gpu", "torch", "gsplat", "preset", "device", "seconds": {extract, track, coarse, fine,
render, eval, total}, "train_minutes" (coarse + fine), "render_fps_512" (median render-only
FPS at 512 px), "render_fps_512_p10", "end_to_end_fps_512", "metrics": {psnr, ssim, face_psnr,
mouth_psnr, mouth_ssim, lmd, lmd_512, aue, mouth_motion, render_fps}, "baselines": {coarse:
{psnr, mouth_psnr}}, "papers": the numbers the papers quote} on one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS = ("psnr", "ssim", "face_psnr", "mouth_psnr", "mouth_ssim", "lmd", "lmd_512", "aue", "mouth_motion",
           "render_fps")
PAPERS = {"gstalker": {"train_minutes": 40, "render_fps": 125, "psnr": 34.65, "lmd": 2.70},
          "note": "on their own clips and GPUs, at 512 px: a reference, not a comparison"}


def summary(run: dict[str, Any], bench: dict[str, Any], versions: dict[str, str] | None = None) -> dict[str, Any]:
    """The summary of one check (see the module docstring)."""
    seconds = {k: round(float(v), 1) for k, v in run["seconds"].items()}
    seconds["total"] = round(sum(seconds.values()), 1)
    m = run["metrics"]
    return {
        **(versions or {}),
        "preset": run.get("preset"),
        "device": run.get("device"),
        "seconds": seconds,
        "train_minutes": round((seconds.get("coarse", 0.0) + seconds.get("fine", 0.0)) / 60.0, 1),
        "render_fps_512": round(float(bench["render_fps_median"]), 1),
        "render_fps_512_p10": round(float(bench["render_fps_p10"]), 1),
        "end_to_end_fps_512": round(float(bench["end_to_end_fps"]), 1),
        "bench_size": bench.get("size"),
        "metrics": {k: m[k] for k in METRICS if k in m},
        "baselines": {"coarse": {k: m["baselines"]["coarse"][k] for k in ("psnr", "mouth_psnr")}},
        "papers": PAPERS,
    }


def versions() -> dict[str, str]:
    """The GPU's name and the torch and gsplat versions of this environment."""
    out: dict[str, str] = {}
    try:
        import torch

        out["torch"] = torch.__version__
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception as exc:  # noqa: BLE001 - decoration only
        out["torch"] = f"unavailable ({exc})"
    try:
        from importlib.metadata import version

        out["gsplat"] = version("gsplat")
    except Exception:  # noqa: BLE001
        out["gsplat"] = "not installed"
    return out


def check_torch() -> int:
    """0 when torch is a CUDA build that sees a GPU; else 3 and the fix on stderr."""
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU seen: {torch.cuda.is_available()}",
          file=sys.stderr)
    if torch.cuda.is_available():
        return 0
    base = torch.__version__.split("+")[0]
    print(f"install a CUDA build of the pinned torch first, e.g. pip install torch=={base} --index-url "
          "https://download.pytorch.org/whl/cu126 (the cuXXX your driver supports)", file=sys.stderr)
    return 3


def main(argv: list[str]) -> int:
    if argv == ["--check-torch"]:
        return check_torch()
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    run = json.loads(Path(argv[0]).read_text())
    bench = json.loads(Path(argv[1]).read_text())
    print(json.dumps(summary(run, bench, versions()), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
