"""Report helpers shared by the evaluations (``eval``, ``eval --audio``, ``eval --compare``):
numbers for JSON, a Markdown table, the Markdown lines of the SyncNet table and of the skipped
metrics, and a metric's table cell. They own no data: each stage formats its own with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# metrics that need weight files the user brings: key -> name in the reports
SKIPPED = {"lpips": "LPIPS", "syncnet": "LSE-C/LSE-D"}


def json_floats(values: Any) -> list[Any]:
    """A list of numbers for JSON: floats rounded to 6 significant digits, NaN/inf -> null
    (ints kept)."""
    out: list[Any] = []
    for v in values:
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out.append(int(v))
        else:
            f = float(v)
            out.append(float(f"{f:.6g}") if np.isfinite(f) else None)
    return out


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: ``header`` (the column titles; the first may be empty),
    the separator, then one line per row of already formatted cells (as many as the header).

    Raises:
        ValueError: a row with another number of cells than the header.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in rows:
        if len(cells) != len(header):
            raise ValueError(f"a table row needs {len(header)} cells, got {len(cells)}: {list(cells)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sync_lines(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines of the lip-sync proxy table (:func:`gstalk.metrics.lipsync.sync_scores`'
    ``sync_corr``, ``sync_lag``, ``sync_corr_best``), one row per named dict that has them."""
    return markdown_table(["lip-sync proxy", "corr at lag 0", "best lag (frames)", "corr at best lag"],
                          [[name, f"{v['sync_corr']:.2f}", f"{v['sync_lag']:+d}", f"{v['sync_corr_best']:.2f}"]
                           for name, v in rows if "sync_corr" in v])


def lse_lines(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines of the SyncNet table (rows whose dict has ``lse_d`` or a
    ``syncnet_note``); [] when no row has either."""
    rows = [(n, v) for n, v in rows if "lse_d" in v or "syncnet_note" in v]
    if not rows:
        return []
    cells = [[name, f"{v['lse_c']:.3f}", f"{v['lse_d']:.3f}", f"{v['syncnet_offset']:+d}", str(v["syncnet_windows"])]
             if "lse_d" in v else [name, "–", "–", "–", str(v["syncnet_note"])] for name, v in rows]
    lines = ["", *markdown_table(["SyncNet", "LSE-C (higher is better)", "LSE-D (lower is better)",
                                  "offset (frames)", "windows"], cells)]
    return lines + ["", "LSE-C/LSE-D as the peers compute them (syncnet_python, offsets ±15 frames, 224 px face "
                    "crops); offset in the reference's sign (−k: the audio is k frames late)."]


def skipped_lines(m: dict[str, Any]) -> list[str]:
    """The report's note on the metrics that need weights the user did not pass ([] when none
    was skipped)."""
    skipped = [k for k in m.get("skipped", []) if k in SKIPPED]
    if not skipped:
        return []
    return ["", f"{'/'.join(SKIPPED[k] for k in skipped)}: skipped "
                f"(pass {' / '.join(f'--{k} PATH' for k in skipped)}; see docs/methods.md for making the files)."]


def fmt_metric(key: str, v: Any) -> str:
    """A metric for a table: 4 decimals for SSIM, AUE and LPIPS, 2 otherwise, "–" when missing/NaN."""
    if v is None:
        return "–"
    if isinstance(v, float) and v != v:
        return "–"
    return f"{v:.4f}" if "ssim" in key or key in ("aue", "lpips") else f"{v:.2f}"
