"""Plots for the eval reports: matplotlib (Agg, no pyplot state), PNGs written atomically.

Each function draws one figure of ``WIDTH`` x ``HEIGHT`` px (at 100 dpi) and writes it to
``path``; NaN entries of a series are gaps in its line.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gstalk.workspace import atomic_write

WIDTH, HEIGHT, DPI = 900, 320, 100


def line_plot(path: str | Path, x: Sequence[float] | np.ndarray, series: Mapping[str, Sequence[float] | np.ndarray],
              *, title: str, xlabel: str, ylabel: str, styles: Mapping[str, str] | None = None) -> None:
    """One PNG with a line per entry of ``series`` (label -> [N] values at ``x`` [N]).

    Args:
        styles: label -> matplotlib format string (e.g. "k--"); default colours otherwise.

    Raises:
        ValueError: a series' length differs from ``x``'s.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = np.asarray(x, dtype=np.float64)
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in series.items():
        y = np.asarray(ys, dtype=np.float64)
        if y.shape != xs.shape:
            raise ValueError(f"series '{label}' has {y.shape} values for {xs.shape} x positions")
        style = (styles or {}).get(label, "-")
        ax.plot(xs, y, style, label=label, linewidth=1.2, markersize=3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def zscore_nan(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """(x − mean) / std over the finite entries of [N]; NaNs stay NaN; a constant series -> 0."""
    a = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(a)
    if not ok.any():
        return a.copy()
    s = a[ok].std()
    return (a - a[ok].mean()) / s if s > 1e-12 else np.where(ok, 0.0, np.nan)


def psnr_plot(path: str | Path, frames: Sequence[int], series: Mapping[str, Sequence[float]],
              styles: Mapping[str, str] | None = None) -> None:
    """Per-frame PSNR (dB) of the test split: frames [N] workspace frame numbers, one [N]
    series per model/baseline (inf, for a perfect frame, is drawn as a gap); ``styles``:
    label -> matplotlib format string (e.g. a dotted trend line)."""
    clean = {k: np.where(np.isfinite(np.asarray(v, dtype=np.float64)), v, np.nan) for k, v in series.items()}
    line_plot(path, frames, clean, title="PSNR per test frame (render vs ground truth)", xlabel="frame",
              ylabel="PSNR (dB)", styles=styles)


def mouth_plot(path: str | Path, frames: Sequence[int], series: Mapping[str, Sequence[float]], *, title: str) -> None:
    """Mouth opening per frame, each series z-scored over the clip (so the measured openings,
    inner-lip gap / face height, and the proxy's audio-predicted opening share an axis)."""
    styles = {k: "k--" for k in series if "audio" in k}
    line_plot(path, frames, {k: zscore_nan(v) for k, v in series.items()}, title=title, xlabel="frame",
              ylabel="mouth opening (z-score)", styles=styles)
