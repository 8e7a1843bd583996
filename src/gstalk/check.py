"""``gstalk check``: verify a workspace against its manifest and say what to re-run.

For each stage, in pipeline order: is it done; does every output it recorded still exist
with the same SHA-256; were the stages it read still the runs it recorded (not re-run
since). Reading only, never changing anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gstalk.workspace import CHECKPOINTS, REQUIRES, STAGES, Workspace


@dataclass(frozen=True)
class Finding:
    """The state of one stage: ``status`` is ``ok``, ``not run`` or ``problem``."""

    stage: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_workspace(ws: Workspace) -> list[Finding]:
    """One :class:`Finding` per stage of ``ws`` (extract, track, coarse, fine)."""
    out: list[Finding] = []
    root = ws.root
    for stage in STAGES:
        rec = ws.stage(stage)
        cmd = f"gstalk {stage} {root}"
        if rec.status == "missing":
            out.append(Finding(stage, "not run", "has not run", cmd))
            continue
        if rec.status != "done":
            fix = f"{cmd} --resume" if _resumable(ws, stage) else cmd
            out.append(Finding(stage, "problem", f"is '{rec.status}' (interrupted or failed)", fix))
            continue
        bad = ws.output_problems(rec.data)
        for dep in REQUIRES[stage]:
            seen = rec.data.get("inputs", {}).get(dep)
            if seen is not None and seen != ws.stage(dep).run_id:
                bad.append(f"stale: '{dep}' was re-run after it")
        if bad:
            out.append(Finding(stage, "problem", "; ".join(bad), cmd))
            continue
        n = len(rec.data.get("outputs", {}))
        failure = rec.data.get("last_failure")
        if failure is None:
            out.append(Finding(stage, "ok", f"done, {n} output(s) verified"))
            continue
        error = str(failure.get("error", "")).splitlines()[0][:120] if failure.get("error") else "interrupted"
        fix = f"{cmd} --resume" if _resumable(ws, stage) else ""
        out.append(Finding(stage, "ok", f"done, {n} output(s) verified; a later re-run failed ({error}) "
                                        "and these outputs were kept", fix))
    return out


def _resumable(ws: Workspace, stage: str) -> bool:
    return stage in ("coarse", "fine") and ws.path(CHECKPOINTS[stage]).exists()


def first_fix(findings: list[Finding]) -> str | None:
    """The command to run first: the fix of the earliest stage with a problem, or None."""
    for f in findings:
        if f.status == "problem":
            return f.fix
    return None


def findings_table(root: Any, findings: list[Finding]) -> Any:
    """The findings as a rich Table (what ``gstalk check`` prints)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"gstalk check {root}")
    for col in ("stage", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "not run": "dim", "problem": "bold red"}
    for f in findings:
        table.add_row(f.stage, f"[{style[f.status]}]{f.status}[/]", escape(f.detail), escape(f.fix))
    return table
