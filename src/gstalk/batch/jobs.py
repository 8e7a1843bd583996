"""Jobs files for ``gstalk batch``: CSV (a header row) or JSONL (one object a line).

One row is one job. ``batch render`` rows name ``avatar`` (a workspace, a ``.gstalk``
bundle or an unpacked bundle folder) and ``audio``, and optionally ``output`` and any
``gstalk render`` option as a column (:data:`RENDER_OPTIONS`, named as the flags are).
``batch train`` rows name ``video``, and optionally ``workspace``, ``preset``, ``model``,
``seed``, ``raster``, ``device``, ``eval``, ``bundle`` and ``speech`` (:data:`TRAIN_OPTIONS`). Relative paths are
taken from the jobs file's folder. Empty CSV cells mean "the default".

A row that cannot run (unknown option, a value of the wrong type, a missing input file, an
output another row writes too) becomes a :class:`Job` with ``error`` set: it fails alone,
the others run. A file that is not a jobs file at all (missing, unreadable, a CSV without a
required column) is refused before anything runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gstalk.errors import InputError, UsageError

KINDS = ("render", "train")
REQUIRED = {"render": ("avatar", "audio"), "train": ("video",)}
RENDER_OPTIONS: dict[str, type] = {"output": str, "pose": str, "background": str, "alpha": bool, "size": int,
                                   "blink": str, "raster": str, "device": str, "articulation_gain": float}
"""Optional columns of a render row: the output path, then ``gstalk render``'s options
(``device``: auto, cpu, cuda, cuda:N; ``articulation_gain``: a number in (0, 5], checked when
the file is read; both left out of the spec unless the row sets them, so older results files
still match)."""
TRAIN_OPTIONS: dict[str, type] = {"workspace": str, "preset": str, "model": str, "seed": int, "raster": str,
                                  "device": str, "eval": bool, "bundle": str, "speech": str}
"""Optional columns of a train row (``eval``: evaluate after fine, default yes; ``bundle``: export
the trained avatar to this ``.gstalk`` path; ``device`` as for render rows; ``speech``: the
speaker's voice in a separate file, ``gstalk extract --speech``, left out of the spec unless set)."""
RENDER_DEFAULTS: dict[str, Any] = {"pose": "loop", "background": "plate", "alpha": False, "size": None,
                                   "blink": "video", "raster": "auto"}
TRAIN_DEFAULTS: dict[str, Any] = {"preset": "cpu-quick", "model": "gstalker", "seed": 0, "raster": "auto",
                                  "eval": True, "bundle": None}
PATH_KEYS = {"render": ("avatar", "audio", "output"), "train": ("video", "workspace", "bundle", "speech")}
TRUE, FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


@dataclass
class Job:
    """One row of a jobs file.

    Attributes:
        kind: ``render`` or ``train``.
        row: 1-based number of the job among the file's rows.
        line: line of the jobs file where the row starts.
        spec: the job, resolved: absolute paths, typed values, defaults filled in.
        error: why the row cannot run (it fails without running), or None.
        error_code: the exit code of that error: 3 for a missing input file, 2 otherwise.
        key: SHA-256 over the spec and the inputs' identity (size and modification time of
            the files, the fine run of a workspace): a re-run skips a job only when its key
            and its finished output are unchanged.
    """

    kind: str
    row: int
    line: int
    spec: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    key: str = ""
    error_code: int = 2

    @property
    def output(self) -> str | None:
        """What the job writes: the video (render) or the workspace (train)."""
        return self.spec.get("output" if self.kind == "render" else "workspace")

    def payload(self) -> dict[str, Any]:
        """What a worker gets (plain JSON-able data)."""
        return {"kind": self.kind, "row": self.row, "line": self.line, "spec": self.spec, "key": self.key}


def results_path(jobs: str | Path) -> Path:
    """The results file beside the jobs file: ``jobs.csv`` -> ``jobs.results.jsonl``."""
    p = Path(jobs)
    return p.with_name(p.stem + ".results.jsonl")


def read_jobs(path: str | Path, kind: str) -> list[Job]:
    """Read a jobs file (CSV or JSONL, told by the suffix ``.csv`` / ``.jsonl``, ``.ndjson``,
    or else by the first character) into jobs, each row checked on its own.

    Raises:
        UsageError: an unknown kind. InputError: the file is missing, unreadable, empty, or a
            CSV lacks a required column (nothing runs).
    """
    if kind not in KINDS:
        raise UsageError(f"Unknown batch kind '{kind}'.", hint=f"use one of: {', '.join(KINDS)}")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Jobs file {p} does not exist.", hint="give a CSV or JSONL file, one job per row "
                         "(docs/batch.md)", path=p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Jobs file {p} cannot be read as UTF-8 text ({exc}).", path=p) from None
    suffix = p.suffix.lower()
    jsonl = suffix in (".jsonl", ".ndjson") or (suffix != ".csv" and text.lstrip().startswith("{"))
    rows = _jsonl_rows(text) if jsonl else _csv_rows(text, p, kind)
    if not rows:
        raise InputError(f"Jobs file {p} holds no jobs.", hint="one job per row (docs/batch.md)", path=p)
    base = p.resolve().parent
    jobs = [_job(kind, i + 1, line, values, err, base, p) for i, (line, values, err) in enumerate(rows)]
    _mark_duplicate_outputs(jobs)
    for job in jobs:
        if job.error is None:
            job.key = job_key(job)
    return jobs


def _jsonl_rows(text: str) -> list[tuple[int, dict[str, Any], str | None]]:
    rows: list[tuple[int, dict[str, Any], str | None]] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            rows.append((n, {}, f"line {n} is not valid JSON ({exc.msg}, column {exc.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.append((n, {}, f"line {n} is a JSON {type(obj).__name__}, not an object of column: value"))
            continue
        rows.append((n, obj, None))
    return rows


def _csv_rows(text: str, p: Path, kind: str) -> list[tuple[int, dict[str, Any], str | None]]:
    import io

    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = [h.strip() for h in (reader.fieldnames or []) if h is not None]
    if not header:
        raise InputError(f"Jobs file {p} holds no jobs.", hint="a header row, then one job per row", path=p)
    missing = [c for c in REQUIRED[kind] if c not in header]
    if missing:
        raise InputError(f"Jobs file {p} has no '{missing[0]}' column (its header: {', '.join(header)}).",
                         hint=f"batch {kind} needs the columns {', '.join(REQUIRED[kind])} (docs/batch.md)", path=p)
    rows: list[tuple[int, dict[str, Any], str | None]] = []
    start = 2
    for rec in reader:
        line = start
        start = reader.line_num + 1
        extra = rec.pop(None, None)  # type: ignore[call-overload]
        values = {str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in rec.items() if k is not None}
        values = {k: v for k, v in values.items() if v not in (None, "")}
        if not values and not extra:
            continue
        err = f"{len(header) + len(extra)} values for {len(header)} columns" if extra else None
        rows.append((line, values, err))
    return rows


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
        raise ValueError(f"{name}: {value!r} is not true or false")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.lstrip("+-").isdigit():
            return int(value)
        raise ValueError(f"{name}: {value!r} is not an integer")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name}: {value!r} is not a number")
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not a text value")
    return str(value)


def _job(kind: str, row: int, line: int, values: dict[str, Any], err: str | None, base: Path, jobs_file: Path) -> Job:
    job = Job(kind=kind, row=row, line=line)
    if err is not None:
        job.error = err
        return job
    options = RENDER_OPTIONS if kind == "render" else TRAIN_OPTIONS
    known = (*REQUIRED[kind], *options)
    unknown = [k for k in values if k not in known]
    if unknown:
        job.error = f"unknown option '{unknown[0]}' (a {kind} row takes: {', '.join(known)})"
        return job
    missing = [k for k in REQUIRED[kind] if values.get(k) in (None, "")]
    if missing:
        job.error = f"no {missing[0]} given"
        return job
    spec: dict[str, Any] = dict(RENDER_DEFAULTS if kind == "render" else TRAIN_DEFAULTS)
    try:
        for k, v in values.items():
            if v is None:
                continue
            spec[k] = _typed(k, v, options.get(k, str))
    except ValueError as exc:
        job.error = str(exc)
        return job
    if "articulation_gain" in spec:
        from gstalk.config import check_articulation_gain

        try:
            spec["articulation_gain"] = check_articulation_gain(spec["articulation_gain"])
        except UsageError as exc:
            job.error = str(exc)
            return job

    def resolve(v: str) -> str:
        q = Path(v).expanduser()
        return str(q if q.is_absolute() else base / q)

    for k in PATH_KEYS[kind]:
        if spec.get(k):
            spec[k] = resolve(spec[k])
    if kind == "render":
        if spec["pose"] not in ("loop", "still"):
            spec["pose"] = resolve(spec["pose"])
        if spec["background"] not in ("plate",) and not spec["background"].startswith("#") \
                and (base / spec["background"]).exists():
            spec["background"] = resolve(spec["background"])
        if not spec.get("output"):
            name = f"{_avatar_name(spec['avatar'])}_{Path(spec['audio']).stem}"
            spec["output"] = str(base / f"{jobs_file.stem}_renders" / (f"{name}_rgba" if spec["alpha"] else
                                                                        f"{name}.mp4"))
        for k in ("avatar", "audio"):
            if not Path(spec[k]).exists():
                job.error, job.error_code = f"{k} {spec[k]} does not exist", 3
                break
    else:
        if not spec.get("workspace"):
            spec["workspace"] = str(base / f"{Path(spec['video']).stem}_ws")
        for k in ("video", "speech"):
            if spec.get(k) and not Path(spec[k]).is_file():
                job.error, job.error_code = f"{k} {spec[k]} does not exist", 3
                break
    job.spec = spec
    return job


def _avatar_name(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix == ".gstalk" else p.name


def _mark_duplicate_outputs(jobs: list[Job]) -> None:
    """A row whose output an earlier row writes too fails (the later one)."""
    seen: dict[str, int] = {}
    for job in jobs:
        if job.error is not None:
            continue
        keys = [job.output] + ([job.spec["bundle"]] if job.spec.get("bundle") else [])
        for k in keys:
            if k is None:
                continue
            real = str(Path(k).resolve())
            if real in seen:
                job.error = f"{k} is also written by row {seen[real]}"
                break
        else:
            for k in keys:
                if k is not None:
                    seen[str(Path(k).resolve())] = job.row


def _fingerprint(path: str) -> Any:
    """The identity of an input: a file's size and modification time; a workspace's fine run;
    an unpacked bundle's bundle.json; None when missing."""
    p = Path(path)
    try:
        if p.is_file():
            st = p.stat()
            return [st.st_size, st.st_mtime_ns]
        if (p / "manifest.json").is_file():
            m = json.loads((p / "manifest.json").read_text())
            return ["workspace", m.get("stages", {}).get("fine", {}).get("run_id")]
        if (p / "bundle.json").is_file():
            return ["bundle", hashlib.sha256((p / "bundle.json").read_bytes()).hexdigest()]
    except (OSError, ValueError):
        return None
    return None


INPUT_KEYS: dict[str, tuple[str, ...]] = {"render": ("avatar", "audio", "pose", "background"),
                                          "train": ("video", "speech")}


def job_key(job: Job, fingerprint: Callable[[str], Any] = _fingerprint) -> str:
    """See :attr:`Job.key`."""
    inputs = {k: fingerprint(job.spec[k]) for k in INPUT_KEYS[job.kind]
              if isinstance(job.spec.get(k), str) and Path(job.spec[k]).exists()}
    blob = json.dumps({"kind": job.kind, "spec": job.spec, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
