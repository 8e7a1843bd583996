"""The batch driver: read the jobs, skip what is done, run the rest on an engine, record each
result as it comes, and report.

Order of work: the jobs file is read and every row checked (:mod:`gstalk.batch.jobs`); the
results file is locked; rows that cannot run are recorded ``failed`` at once; rows whose
output is complete and valid from an earlier run are recorded ``skipped``; the others go to
the engine, and each one's record is appended the moment it ends. Leftover temporary
folders of renders killed in an earlier run are removed first (their owner process is gone).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from gstalk.batch.engines import make_engine
from gstalk.batch.jobs import Job, read_jobs, results_path
from gstalk.batch.results import ResultsFile, last_by_key, output_intact
from gstalk.progress import SILENT, Reporter
from gstalk.workspace import now_iso


def run_batch(kind: str, jobs_file: str | Path, *, engine: str = "local", workers: int | None = None,
              threads: int | None = None, address: str | None = None, gpus: float = 0.0, force: bool = False,
              results: str | Path | None = None, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Run a batch (``gstalk batch render|train``).

    Args:
        kind: ``render`` or ``train``.
        jobs_file: the CSV or JSONL jobs file.
        engine: ``local`` or ``ray`` (:mod:`gstalk.batch.engines`).
        workers, threads: local engine: worker processes and threads each (default: one
            worker per core, one thread each); ray: ``threads`` = CPUs per job.
        address: ray: the cluster's address (None: a local cluster).
        gpus: ray: GPUs per job.
        force: run every job, even those whose output is complete from an earlier run.
        results: the results file (default ``JOBS.results.jsonl`` beside the jobs file).

    Returns:
        {"jobs", "ok", "failed", "skipped", "seconds", "jobs_per_minute", "results",
        "engine", "failures": [{"row", "error"}, ...], "run"}.

    Raises:
        InputError: a jobs file that is missing or not one (nothing runs). UsageError: bad
        engine options. DependencyError: Ray missing. LockError: another batch writes the
        same results file.
    """
    t0 = time.perf_counter()
    jobs = read_jobs(jobs_file, kind)
    eng = make_engine(engine, workers=workers, threads=threads, address=address, gpus=gpus)
    res = ResultsFile(results if results is not None else results_path(jobs_file))
    run_id = uuid.uuid4().hex[:12]
    counts = {"ok": 0, "failed": 0, "skipped": 0, "running": 0}
    failures: list[dict[str, Any]] = []
    with res.open():
        previous = {} if force else last_by_key(res.read())

        def record(rec: dict[str, Any]) -> None:
            rec = {**rec, "run": run_id, "engine": eng.name, "finished": now_iso()}
            res.append(rec)
            counts[rec["status"]] += 1
            if rec["status"] == "failed":
                failures.append({"row": rec["row"], "line": rec.get("line"), "error": rec.get("error")})
                reporter.warn(f"row {rec['row']} (line {rec.get('line')}) failed: {rec.get('error')}")

        todo: list[Job] = []
        for job in jobs:
            if job.error is not None:
                record({"row": job.row, "line": job.line, "kind": kind, "status": "failed", "output": job.output,
                        "seconds": 0.0, "error": job.error, "exit_code": job.error_code, "key": job.key})
                continue
            prev = previous.get(job.key)
            if prev is not None and output_intact(prev):
                keep = {k: v for k, v in prev.items() if k not in ("run", "engine", "finished", "seconds", "worker",
                                                                   "status", "line", "row")}
                record({**keep, "row": job.row, "line": job.line, "status": "skipped", "seconds": 0.0,
                        "error": None, "skipped_because": f"output complete (run {prev.get('run')}, "
                                                          f"{prev.get('finished')})"})
                continue
            todo.append(job)
        for job in todo:
            _clean_dead_scratch(job)
        # the rows of one avatar together: a worker keeps the avatars it loaded (a few), so
        # grouped rows load each avatar about once per worker instead of once per row
        todo.sort(key=lambda j: str(j.spec.get("avatar", "")))
        reporter.log(f"[bold]batch {kind}[/bold] {len(jobs)} job(s): {counts['skipped']} already done, "
                     f"{counts['failed']} bad row(s), {len(todo)} to run on the {eng.describe()}; results: {res.path}")
        t_run = time.perf_counter()
        done_n = 0
        with reporter.task(f"batch {kind}", len(todo)) as bar:

            def info() -> str:
                el = max(time.perf_counter() - t_run, 1e-9)
                rate = done_n / el * 60.0
                return (f"{counts['ok']} ok · {counts['failed']} failed · {counts['running']} running"
                        + (f" · {counts['skipped']} skipped" if counts["skipped"] else "")
                        + (f" · {rate:.1f} jobs/min" if done_n else ""))

            def started(job: Job) -> None:
                counts["running"] += 1
                bar.update(info=info())

            def finished(job: Job, rec: dict[str, Any]) -> None:
                nonlocal done_n
                counts["running"] = max(0, counts["running"] - 1)
                done_n += 1
                record(rec)
                bar.advance()
                bar.update(info=info())

            if todo:
                try:
                    eng.run(todo, started, finished, lambda: bar.update(info=info()))
                finally:
                    close = getattr(eng, "close", None)
                    if close is not None:
                        close()
    seconds = time.perf_counter() - t0
    ran = counts["ok"] + counts["failed"]
    run_s = time.perf_counter() - t_run
    return {"kind": kind, "jobs": len(jobs), "ok": counts["ok"], "failed": counts["failed"],
            "skipped": counts["skipped"], "seconds": round(seconds, 3), "run_seconds": round(run_s, 3),
            "jobs_per_minute": round(len(todo) / run_s * 60.0, 2) if todo and run_s > 0 else None,
            "results": str(res.path), "engine": eng.describe(), "run": run_id, "failures": failures,
            "ran": ran}


_SCRATCH = re.compile(r"^\.tmp-render-(.+)-(\d+)-[a-z0-9_]+$")


def _clean_dead_scratch(job: Job) -> None:
    """Remove ``.tmp-render-HOST-PID-*`` folders beside the job's output whose process, on this
    host, is gone (a render killed half way; ``gstalk render`` names its scratch folder so).
    Other hosts' folders are left alone: on shared storage their renders may be running."""
    out = job.output
    if job.kind != "render" or out is None:
        return
    folder = Path(out).parent
    if not folder.is_dir():
        return
    host = socket.gethostname()
    for p in folder.iterdir():
        m = _SCRATCH.match(p.name)
        if m and m.group(1) == host and p.is_dir() and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # a zombie has finished
            return False
    return True
