"""``gstalk eval --compare WS1 WS2 …``: one table of the eval metrics of several workspaces.

Each workspace's ``eval/metrics.json`` is read (and made first, with :func:`run_eval`, when
it is missing or older than the fine model). A row per workspace gives the model, the fine
settings that differ from its preset's defaults (so ablations are labelled), the test-split
metrics, the Gaussian count, the fine training time and the render speed; the static coarse
baseline is added once per distinct coarse run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gstalk.config import get_preset
from gstalk.progress import SILENT, Reporter
from gstalk.workspace import Workspace

COLUMNS = ("psnr", "ssim", "face_psnr", "mouth_psnr", "mouth_ssim", "lmd", "aue", "mouth_motion")
OPTIONAL = ("lpips", "lse_c", "lse_d")  # columns shown when a workspace was evaluated with --lpips / --syncnet


def changed_settings(ws: Workspace) -> dict[str, Any]:
    """The fine config entries of ``ws`` that differ from its preset's defaults (``model``,
    ``raster`` and logging excluded)."""
    cfg = ws.stage("fine").config
    defaults = dataclasses.asdict(get_preset(ws.preset).fine)
    skip = {"model", "raster", "log_every", "checkpoint_every"}
    return {k: v for k, v in cfg.items() if k not in skip and k in defaults and defaults[k] != v}


def load_or_run_eval(path: Path, *, backend: str = "auto", reporter: Reporter = SILENT) -> dict[str, Any]:
    """``eval/metrics.json`` of the workspace at ``path``, evaluating first when it is missing
    or older than ``fine/model.safetensors``."""
    from gstalk.stages.evaluate import run_eval

    ws = Workspace.open(path)
    metrics = ws.path("eval", "metrics.json")
    model = ws.path("fine", "model.safetensors")
    if metrics.exists() and (not model.exists() or metrics.stat().st_mtime >= model.stat().st_mtime):
        return json.loads(metrics.read_text(encoding="utf-8"))
    reporter.log(f"evaluating {path} (no up-to-date eval/metrics.json)")
    return run_eval(str(path), backend=backend, reporter=reporter)


def compare(paths: list[Path], *, backend: str = "auto", reporter: Reporter = SILENT) -> dict[str, Any]:
    """Rows for :data:`COLUMNS` across workspaces.

    Returns:
        {"rows": [{"name", "workspace", "model", "settings", <COLUMNS>, <OPTIONAL>, "n_gaussians",
        "fine_seconds", "render_fps"}, …], "columns": [...]}; baseline rows have model
        ``"coarse (static)"``; "columns" adds the :data:`OPTIONAL` ones (LPIPS, LSE-C, LSE-D)
        that some workspace has.

    Raises:
        WorkspaceError: a path is not a workspace, or its fine stage is not done.
    """
    rows: list[dict[str, Any]] = []
    seen_coarse: set[str] = set()
    for p in paths:
        ws = Workspace.open(p)
        ws.require("eval")
        m = load_or_run_eval(p, backend=backend, reporter=reporter)
        fine = ws.stage("fine")
        settings = changed_settings(ws)
        label = m.get("model_name", fine.config.get("model", "?"))
        if settings:
            label += " (" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"
        row = {"name": label, "workspace": str(p), "model": m.get("model_name"), "settings": settings,
               **{k: m.get(k) for k in COLUMNS + OPTIONAL},
               "n_gaussians": fine.summary.get("n_gaussians"),
               "fine_seconds": (m.get("training_seconds") or {}).get("fine"), "render_fps": m.get("render_fps")}
        coarse_id = str(ws.stage("coarse").run_id)
        base = m.get("baselines", {}).get("coarse")
        if base is not None and coarse_id not in seen_coarse:
            seen_coarse.add(coarse_id)
            rows.append({"name": f"coarse (static) of {Path(p).name}", "workspace": str(p),
                         "model": "coarse (static)", "settings": {}, **{k: base.get(k) for k in COLUMNS + OPTIONAL},
                         "n_gaussians": None, "fine_seconds": None, "render_fps": None})
        rows.append(row)
    extra = [k for k in OPTIONAL if any(r.get(k) is not None for r in rows)]
    return {"columns": list(COLUMNS) + extra, "rows": rows}


def compare_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    cols = result["columns"]
    head = "| model | " + " | ".join(cols) + " | Gaussians | fine s | render FPS |"
    lines = [head, "|---|" + "---|" * (len(cols) + 3)]
    for r in result["rows"]:
        cells = [fmt_metric(k, r.get(k)) for k in cols]
        cells += [str(r["n_gaussians"]) if r["n_gaussians"] else "–",
                  f"{r['fine_seconds']:.0f}" if r["fine_seconds"] else "–",
                  f"{r['render_fps']:.1f}" if r["render_fps"] else "–"]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_metric(key: str, v: Any) -> str:
    """A metric for a table: 4 decimals for SSIM, AUE and LPIPS, 2 otherwise, "–" when missing/NaN."""
    if v is None:
        return "–"
    if isinstance(v, float) and v != v:
        return "–"
    return f"{v:.4f}" if "ssim" in key or key in ("aue", "lpips") else f"{v:.2f}"
