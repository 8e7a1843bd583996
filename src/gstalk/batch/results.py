"""The results file of a batch: ``JOBS.results.jsonl``, one JSON object per finished job.

Each line: ``row``, ``line``, ``kind``, ``status`` (``ok``, ``failed`` or ``skipped``),
``output``, ``seconds``, ``error`` (the one-line message, or null), ``exit_code`` (the
:mod:`gstalk.errors` code of a failure), ``key`` (:attr:`gstalk.batch.jobs.Job.key`),
``run`` (the batch run's id), ``finished``, ``engine``, ``worker`` (host:pid), and per
kind: ``output_sha256``, ``frames``, ``duration_s`` (render); ``fine_run_id``,
``stages_run``, ``eval``, ``bundle_sha256`` (train).

The file is only appended to, a line at a time, flushed and fsync'ed as each job ends, so a
batch killed with kill -9 keeps every finished job's line (a line cut short by the kill is
ignored when read). A re-run reads it to skip jobs whose output is complete and valid: the
last record with the same key is ``ok`` (or ``skipped`` after one) and the output still has
the size and SHA-256 recorded (for a training job: the workspace's fine stage is the run
recorded, its outputs intact, and the bundle as recorded).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from gstalk.errors import LockError
from gstalk.workspace import sha256_output


class ResultsFile:
    """Append-only JSONL results, locked (``flock``) while a batch writes it.

    Args:
        path: the results file (created on :meth:`open`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: Any = None

    def read(self) -> list[dict[str, Any]]:
        """Every complete record, in order (lines that do not parse are skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    @contextlib.contextmanager
    def open(self) -> Any:
        """Hold the file open for appending, locked.

        Raises:
            LockError: another batch is writing these results (the same jobs file).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockError(f"{self.path} is being written by another gstalk batch.",
                                hint="wait for it to finish (or stop it), then re-run") from None
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # a line cut short by a kill: start on a fresh line
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            self._f = f
            yield self
        finally:
            self._f = None
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line, flushed and fsync'ed (inside :meth:`open`)."""
        assert self._f is not None, "append() outside open()"
        self._f.write(json.dumps(record, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())


def last_by_key(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last ``ok`` or ``skipped`` record of each job key."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("status") in ("ok", "skipped") and r.get("key"):
            out[r["key"]] = r
        elif r.get("status") == "failed" and r.get("key") in out:
            del out[r["key"]]  # a later failure: the output may have been replaced since
    return out


def output_intact(rec: dict[str, Any]) -> bool:
    """Whether a finished job's output is still what it recorded (see the module docstring)."""
    try:
        if rec.get("kind") == "train":
            return _workspace_intact(rec)
        p = Path(rec["output"])
        if not p.exists() or not rec.get("output_sha256"):
            return False
        if p.is_file() and p.stat().st_size != rec.get("output_bytes"):
            return False
        return sha256_output(p) == rec["output_sha256"]
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _workspace_intact(rec: dict[str, Any]) -> bool:
    from gstalk.errors import GstalkError
    from gstalk.workspace import Workspace

    try:
        ws = Workspace.open(rec["output"])
        ws.require("render")
    except GstalkError:
        return False
    fine = ws.stage("fine")
    if fine.run_id != rec.get("fine_run_id") or ws.output_problems(fine.data):
        return False
    if rec.get("bundle"):
        b = Path(rec["bundle"])
        return b.is_file() and sha256_output(b) == rec.get("bundle_sha256")
    return True
