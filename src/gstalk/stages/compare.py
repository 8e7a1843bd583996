"""``gstalk eval --compare WS1 WS2 …``: one table of the eval metrics of several workspaces.

Each workspace's ``eval/metrics.json`` is read; it must be current: the manifest records the
eval run and the runs it read, so a model re-trained since, or an eval that never finished,
is told from the manifest, not from file times (:func:`needs_eval`; the CLI evaluates those
first, :func:`gstalk.pipeline.evaluate_stale`). A row per workspace gives the model, the fine
settings that differ from its preset's defaults (so ablations are labelled), the test-split
metrics, the Gaussian count, the fine training time and the render speed; the static coarse
baseline is added once per distinct coarse run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gstalk.config import flat_settings, get_preset
from gstalk.errors import WorkspaceError
from gstalk.metrics.report import fmt_metric, markdown_table
from gstalk.workspace import EVAL_METRICS, Workspace

COLUMNS = ("psnr", "ssim", "face_psnr", "mouth_psnr", "mouth_ssim", "lmd", "aue", "mouth_motion")
OPTIONAL = ("lpips", "lse_c", "lse_d")  # columns shown when a workspace was evaluated with --lpips / --syncnet


def changed_settings(ws: Workspace) -> dict[str, Any]:
    """The fine config entries of ``ws`` that differ from its preset's defaults (``model``,
    ``raster``, ``device`` and logging excluded; the trained model's own settings by their
    ``--set`` names)."""
    cfg = flat_settings(ws.stage("fine").config)
    defaults = flat_settings(dataclasses.asdict(get_preset(ws.preset).fine) | {"model": cfg.get("model")})
    skip = {"model", "raster", "device", "log_every", "checkpoint_every"}
    return {k: v for k, v in cfg.items() if k not in skip and k in defaults and defaults[k] != v}


def needs_eval(path: Path) -> bool:
    """Whether the workspace at ``path`` has no eval that describes its current model (none
    recorded, an interrupted one, one made before the fine or coarse stage was re-run, or
    ``eval/metrics.json`` changed since): :meth:`~gstalk.workspace.Workspace.is_current`."""
    return not Workspace.open(path).is_current("eval")


def read_metrics(ws: Workspace) -> dict[str, Any]:
    """``eval/metrics.json`` of ``ws``, which must be current.

    Raises:
        WorkspaceError: no current eval (the hint gives the command).
    """
    if not ws.is_current("eval"):
        raise WorkspaceError(f"{ws.root} has no eval of its current model.", hint=f"run `gstalk eval {ws.root}`")
    return json.loads(ws.path(EVAL_METRICS).read_text(encoding="utf-8"))


def compare(paths: list[Path]) -> dict[str, Any]:
    """Rows for :data:`COLUMNS` across workspaces whose evals are current (:func:`needs_eval`).

    Returns:
        {"rows": [{"name", "workspace", "model", "settings", <COLUMNS>, <OPTIONAL>, "n_gaussians",
        "fine_seconds", "render_fps"}, …], "columns": [...]}; baseline rows have model
        ``"coarse (static)"``; "columns" adds the :data:`OPTIONAL` ones (LPIPS, LSE-C, LSE-D)
        that some workspace has.

    Raises:
        WorkspaceError: a path is not a workspace, its fine stage is not done, or it has no
            current eval.
    """
    rows: list[dict[str, Any]] = []
    seen_coarse: set[str] = set()
    for p in paths:
        ws = Workspace.open(p)
        ws.require("eval")
        m = read_metrics(ws)
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
    rows = [[r["name"], *(fmt_metric(k, r.get(k)) for k in cols),
             str(r["n_gaussians"]) if r["n_gaussians"] else "–",
             f"{r['fine_seconds']:.0f}" if r["fine_seconds"] else "–",
             f"{r['render_fps']:.1f}" if r["render_fps"] else "–"] for r in result["rows"]]
    return "\n".join(markdown_table(["model", *cols, "Gaussians", "fine s", "render FPS"], rows))


def compare_table(result: dict[str, Any]) -> Any:
    """The comparison as a rich Table (what ``gstalk eval --compare`` prints)."""
    from rich.table import Table

    t = Table(title="gstalk eval --compare: test split")
    for c in ("model", *result["columns"], "Gaussians", "fine s", "render FPS"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for r in result["rows"]:
        t.add_row(r["name"], *[fmt_metric(k, r.get(k)) for k in result["columns"]],
                  str(r["n_gaussians"] or "–"), f"{r['fine_seconds']:.0f}" if r["fine_seconds"] else "–",
                  f"{r['render_fps']:.1f}" if r["render_fps"] else "–")
    return t
