"""Rasterizer benchmark (``gstalk bench raster`` / ``python benchmarks/raster.py``).

Scenes are head-like blobs (:func:`gstalk.raster.scenes.head_blob`): N Gaussians in a
0.1 m-radius ball 0.5 m in front of a camera with focal 1.2·width, scales 1–10 mm,
opacities 0.1–0.9. For every (size, backend) it measures, with warm-up and the median of
the repeats:

* ``fwd_ms``: one full :func:`gstalk.raster.rasterize` call (projection, binning,
  compositing) under ``torch.no_grad()``; ``fps = 1000 / fwd_ms``;
* ``fwd_bwd_ms``: rasterize with differentiable inputs + an L1 loss + ``backward()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from gstalk.raster.api import rasterize
from gstalk.raster.backends import available_backends
from gstalk.raster.scenes import head_blob

DEFAULT_SIZES: tuple[tuple[int, int, int], ...] = ((256, 256, 10_000), (512, 512, 10_000), (512, 512, 50_000))


def _median_ms(fn: Callable[[], None], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(width: int, height: int, n: int, backend: str, *, repeats: int = 5, warmup: int = 1,
              backward: bool = True, device: str = "cpu") -> dict:  # fmt: skip
    """Time one (size, backend) pair; returns a result row (see module docstring)."""
    scene = head_blob(n, width, height, seed=0, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def fwd() -> None:
        with torch.no_grad():
            rasterize(**scene, backend=backend)

    fwd_ms = _median_ms(fwd, repeats, warmup, sync)
    fwd_bwd_ms = None
    if backward:
        names = ("means", "quats", "scales", "opacities", "colors")
        params = {k: scene[k].clone().requires_grad_(True) for k in names}
        args = dict(scene, **params)
        target = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1)).to(device)

        def fwd_bwd() -> None:
            for p in params.values():
                p.grad = None
            colors, _, _ = rasterize(**args, backend=backend)
            (colors - target).abs().mean().backward()

        fwd_bwd_ms = _median_ms(fwd_bwd, repeats, warmup, sync)
    return {
        "width": width, "height": height, "n": n, "backend": backend,
        "fwd_ms": round(fwd_ms, 2), "fwd_bwd_ms": None if fwd_bwd_ms is None else round(fwd_bwd_ms, 2),
        "fps": round(1000.0 / fwd_ms, 1), "device": device, "threads": torch.get_num_threads(),
    }  # fmt: skip


def run(
    sizes: Sequence[tuple[int, int, int]] = DEFAULT_SIZES,
    backends: Sequence[str] | None = None,
    *,
    repeats: int = 5,
    warmup: int = 1,
    torch_repeats: int | None = None,
    torch_warmup: int | None = None,
    backward: bool = True,
    progress: Callable[[str], None] | None = None,
    torch_device: str = "cpu",
) -> list[dict]:
    """Benchmark ``backends`` (default: ``torch``, ``cpu`` and any usable CUDA backend).

    Args:
        sizes: ``(width, height, n_gaussians)`` triples.
        backends: names; unavailable ones are skipped (reported through ``progress``).
        repeats, warmup: timed and untimed runs per measurement (median reported).
        torch_repeats, torch_warmup: the same for the slow ``torch`` backend (defaults:
            ``repeats`` and ``min(warmup, 1)``).
        backward: also time forward + backward.
        progress: called with one line per measurement (e.g. ``print``).
        torch_device: where the ``torch`` reference backend runs (``cpu`` or ``cuda``; the
            ``cpu`` backend always runs on the CPU, gsplat and inria on CUDA).

    Returns:
        rows ``{width, height, n, backend, fwd_ms, fwd_bwd_ms, fps, device, threads}``.
    """
    status = available_backends()
    if backends is None:
        backends = ["torch", "cpu"] + [b for b in ("gsplat", "inria") if status.get(b) == "ok"]
    rows = []
    for w, h, n in sizes:
        for name in backends:
            cuda = name in ("gsplat", "inria")
            device = "cuda" if cuda else torch_device if name == "torch" else "cpu"
            reason = available_backends(device).get(name, "unknown backend")
            if reason != "ok":
                if progress:
                    progress(f"skip {name}: {reason}")
                continue
            reps = torch_repeats if (name == "torch" and torch_repeats is not None) else repeats
            wu = warmup
            if name == "torch":
                wu = min(warmup, 1) if torch_warmup is None else torch_warmup
            row = bench_one(w, h, n, name, repeats=reps, warmup=wu, backward=backward, device=device)
            rows.append(row)
            if progress:
                progress(f"{w}x{h} n={n} {name}: fwd {row['fwd_ms']} ms, fwd+bwd {row['fwd_bwd_ms']} ms")
    return rows


def speedups(rows: list[dict], num: str = "torch", den: str = "cpu") -> dict[tuple[int, int, int], dict]:
    """``{(w, h, n): {"fwd": t_num/t_den, "fwd_bwd": ...}}`` for sizes measured with both."""
    by = {(r["width"], r["height"], r["n"], r["backend"]): r for r in rows}
    out = {}
    for (w, h, n, b), r in by.items():
        other = by.get((w, h, n, num))
        if b != den or other is None:
            continue
        ratio = {"fwd": round(other["fwd_ms"] / r["fwd_ms"], 1)}
        if r["fwd_bwd_ms"] and other["fwd_bwd_ms"]:
            ratio["fwd_bwd"] = round(other["fwd_bwd_ms"] / r["fwd_bwd_ms"], 1)
        out[(w, h, n)] = ratio
    return out


def format_table(rows: list[dict]) -> str:
    """Plain-text table of the rows plus the cpu-vs-torch speed-ups."""
    head = f"{'size':>9} {'N':>7} {'backend':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fps':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fb = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.1f}"
        size = f"{r['width']}x{r['height']}"
        lines.append(f"{size:>9} {r['n']:>7} {r['backend']:>8} {r['fwd_ms']:>9.1f} {fb:>11} {r['fps']:>7.1f}")
    for (w, h, n), ratio in speedups(rows).items():
        lines.append(f"speed-up cpu vs torch at {w}x{h}, N={n}: " + ", ".join(f"{k} {v}x" for k, v in ratio.items()))
    return "\n".join(lines)


def _print_rich(rows: list[dict]) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    table = Table(title="gstalk rasterizer benchmark")
    for col in ("size", "N", "backend", "fwd ms", "fwd+bwd ms", "fps"):
        table.add_column(col, justify="right")
    for r in rows:
        fb = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.1f}"
        size = f"{r['width']}x{r['height']}"
        table.add_row(size, str(r["n"]), r["backend"], f"{r['fwd_ms']:.1f}", fb, f"{r['fps']:.1f}")
    console = Console()
    console.print(table)
    for (w, h, n), ratio in speedups(rows).items():
        console.print(f"speed-up cpu vs torch at {w}x{h}, N={n}: " + ", ".join(f"{k} {v}x" for k, v in ratio.items()))
    return True


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        w, h, n = (int(v) for v in item.lower().split("x"))
        out.append((w, h, n))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="gstalk bench raster", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_parse_sizes, default=list(DEFAULT_SIZES),
                    help="comma-separated WxHxN, default 256x256x10000,512x512x10000,512x512x50000")  # fmt: skip
    ap.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b], default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--torch-repeats", type=int, default=None, help="repeats for the slow torch backend")
    ap.add_argument("--quick", action="store_true", help="torch: 1 run, no warm-up; others: 3 repeats (< 2 min)")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    ap.add_argument("--device", default="cpu", help="where the torch reference backend runs: cpu (default), cuda "
                                                    "or auto (cuda when torch sees a GPU)")
    args = ap.parse_args(argv)
    from gstalk.device import resolve_device

    torch_device = str(resolve_device(args.device, "torch"))
    torch_warmup = None
    if args.quick:
        args.repeats, args.torch_repeats, torch_warmup = min(args.repeats, 3), 1, 0
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.json else None
    if log:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}")
    rows = run(args.sizes, args.backends, repeats=args.repeats, warmup=args.warmup,
               torch_repeats=args.torch_repeats, torch_warmup=torch_warmup, backward=not args.no_backward,
               progress=log, torch_device=torch_device)  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not _print_rich(rows):
        print(format_table(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
