"""The versioned on-disk workspace that the stages share.

Layout (``docs/workspace.md`` lists every file)::

    ws/
      manifest.json        schema version, gstalk version, one record per stage
      .lock                held (flock) by the process running a stage
      extract/ track/ coarse/ fine/ renders/ eval/

Every write goes through :func:`atomic_write` / :func:`atomic_dir` (temp file or folder,
fsync, ``os.replace``), so a stage killed half way leaves the previous files intact and
the manifest consistent. A stage record looks like::

    {"status": "done", "run_id": "…", "config": {…}, "inputs": {"track": "<run_id>"},
     "outputs": {"coarse/point_cloud.ply": "<sha256>", …}, "started": "…", "finished": "…",
     "seconds": 81.2, "versions": {…}, "summary": {…}}

A re-run that fails over a finished run whose files are intact gives that run back (it
stays ``done``; the failure is recorded under ``last_failure``), see :meth:`Workspace.fail`.

A stage requires earlier ones through :meth:`Workspace.require`: missing, unfinished or
stale (re-run since) stages raise :class:`~gstalk.errors.WorkspaceError` with the command
that fixes it. Every stage, eval included, runs through :func:`run_stage` (lock, begin,
fail, finish), and the files each writes are named once, here (:data:`OUTPUTS`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gstalk import __version__
from gstalk.errors import GstalkError, LockError, WorkspaceError, resource_error

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("extract", "track", "coarse", "fine")
# Which earlier stages each stage reads.
REQUIRES: dict[str, tuple[str, ...]] = {
    "extract": (),
    "track": ("extract",),
    "coarse": ("extract", "track"),
    "fine": ("extract", "track", "coarse"),
    # render reads the coarse stage's refined cameras (coarse/cameras.safetensors): a coarse
    # re-run after fine makes the model stale for render too
    "render": ("extract", "track", "coarse", "fine"),
    "eval": ("extract", "track", "coarse", "fine"),
}


# What each stage writes, relative to the workspace root: the one place these names are spelled
# (docs/workspace.md describes each file).
EXTRACT_FRAMES = "extract/frames"
EXTRACT_AUDIO = "extract/audio.wav"
AUDIO_FEATURES = "extract/audio_features.safetensors"
EXTRACT_SUMMARY = "extract/summary.json"
TRACKS = "track/tracks.safetensors"
TRACK_MASKS = "track/masks"
PLATE = "track/background.png"
TRACK_PREVIEW = "track/preview.png"
TRACK_SUMMARY = "track/summary.json"
COARSE_GAUSSIANS = "coarse/gaussians.safetensors"
COARSE_PLY = "coarse/point_cloud.ply"
COARSE_PREVIEW = "coarse/preview.png"
COARSE_SUMMARY = "coarse/summary.json"
COARSE_CHECKPOINT = "coarse/checkpoint.safetensors"
COARSE_CAMERAS = "coarse/cameras.safetensors"
COARSE_BASIS = "coarse/articulation_basis.safetensors"  # the coarse fit's articulation basis (optional)
FINE_MODEL = "fine/model.safetensors"
FINE_PLY = "fine/point_cloud.ply"
FINE_PREVIEW = "fine/preview.png"
FINE_SUMMARY = "fine/summary.json"
FINE_CHECKPOINT = "fine/checkpoint.safetensors"
RENDERS = "renders"
EVAL_METRICS = "eval/metrics.json"
EVAL_REPORT = "eval/report.md"
EVAL_SAMPLES = "eval/samples.png"
EVAL_PSNR_PLOT = "eval/psnr.png"
EVAL_MOUTH_PLOT = "eval/mouth.png"
# the training checkpoint a stopped stage resumes from (deleted when the stage finishes)
CHECKPOINTS = {"coarse": COARSE_CHECKPOINT, "fine": FINE_CHECKPOINT}
# the outputs each stage records in the manifest (with their checksums)
OUTPUTS: dict[str, tuple[str, ...]] = {
    "extract": (EXTRACT_FRAMES, EXTRACT_AUDIO, AUDIO_FEATURES, EXTRACT_SUMMARY),
    "track": (TRACKS, TRACK_MASKS, PLATE, TRACK_PREVIEW, TRACK_SUMMARY),
    "coarse": (COARSE_GAUSSIANS, COARSE_PLY, COARSE_PREVIEW, COARSE_SUMMARY, COARSE_CAMERAS),
    "fine": (FINE_MODEL, FINE_PLY, FINE_PREVIEW, FINE_SUMMARY),
    "eval": (EVAL_METRICS, EVAL_REPORT, EVAL_SAMPLES, EVAL_PSNR_PLOT, EVAL_MOUTH_PLOT),
}


def now_iso() -> str:
    """Current UTC time as an ISO-8601 string with seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hex SHA-256 over a folder: relative names and file hashes, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_output(path: str | Path) -> str:
    """Hex SHA-256 of a stage output: :func:`sha256_tree` of a folder, :func:`sha256_file` of a file."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def _raise_os_error(exc: OSError, path: Path) -> None:
    """Re-raise a disk-full / not-writable OS error as :class:`ResourceError` naming ``path``;
    any other OS error unchanged."""
    err = resource_error(exc, path)
    if err is not None:
        raise err from exc
    raise exc


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    If the block raises (or the process dies), ``path`` keeps its old content and the temp
    file is removed (or left as ``.tmp-*``, which :func:`clean_temp` deletes).

    Raises:
        ResourceError: disk full or folder not writable.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    except OSError as exc:
        _raise_os_error(exc, path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _raise_os_error(exc, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, raising :class:`WorkspaceError` (with the path) if it is corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkspaceError(f"{path} is missing.", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"{path} is not valid JSON ({exc}).",
                             hint="delete the file and re-run the stage that writes it", path=path) from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``path``; on success replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".old-{path.name}.{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_os_error(exc, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_temp(folder: str | Path) -> None:
    """Delete leftovers (``.tmp-*``, ``.old-*``) of writes that were killed in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in folder.glob(".old-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@dataclass
class StageRecord:
    """One stage's manifest entry (see the module docstring)."""

    name: str
    data: dict[str, Any]

    @property
    def status(self) -> str:
        return self.data.get("status", "missing")

    @property
    def run_id(self) -> str | None:
        return self.data.get("run_id")

    @property
    def config(self) -> dict[str, Any]:
        return self.data.get("config", {})

    @property
    def summary(self) -> dict[str, Any]:
        return self.data.get("summary", {})


class Workspace:
    """A gstalk workspace folder.

    Args:
        root: the workspace folder.

    Raises:
        WorkspaceError: (from :meth:`open`) folder or manifest missing, manifest corrupt, or
            written by a newer schema than this gstalk understands.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        self._manifest: dict[str, Any] | None = None

    # ----------------------------------------------------------------- creation / loading
    @classmethod
    def create(cls, root: str | Path, *, preset: str, seed: int, source: dict[str, Any]) -> Workspace:
        """Create (or reuse) a workspace folder and write a fresh manifest if none exists; a
        reused one records ``source`` (the files extract reads: the video, and a separate
        speech file when there is one, each ``{path, sha256}``) when it differs.

        Raises:
            WorkspaceError / ResourceError: the folder cannot be made, or its manifest is
                damaged or cannot be written.
        """
        ws = cls(root)
        try:
            ws.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _raise_os_error(exc, ws.root)
        if ws.manifest_path.exists():
            ws.load()
            if ws.manifest.get("source") != source:  # extracting again, from other files
                ws.manifest["source"] = source
                ws.save()
            return ws
        ws._manifest = {
            "schema_version": SCHEMA_VERSION,
            "gstalk_version": __version__,
            "created": now_iso(),
            "preset": preset,
            "seed": seed,
            "source": source,
            "stages": {},
        }
        ws.save()
        return ws

    @classmethod
    def open(cls, root: str | Path) -> Workspace:
        """Open an existing workspace, checking its schema version."""
        ws = cls(root)
        if not ws.root.is_dir():
            raise WorkspaceError(f"Workspace {ws.root} does not exist.",
                                 hint="run `gstalk extract VIDEO --workspace DIR` first", path=ws.root)
        if not ws.manifest_path.exists():
            raise WorkspaceError(f"{ws.root} is not a gstalk workspace (no {MANIFEST}).",
                                 hint="run `gstalk extract VIDEO --workspace DIR` to create one", path=ws.root)
        ws.load()
        return ws

    def load(self) -> dict[str, Any]:
        damaged = "the manifest is damaged; re-run `gstalk extract`"
        try:
            m = read_json(self.manifest_path)
        except WorkspaceError as exc:  # deleting the manifest, read_json's generic fix, would orphan the folder
            raise WorkspaceError(exc.message, hint="restore manifest.json from a backup, or start the workspace "
                                 f"again: `gstalk extract VIDEO -w {self.root}` then the later stages",
                                 path=self.manifest_path) from None
        version = m.get("schema_version") if isinstance(m, dict) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise WorkspaceError(f"{self.manifest_path} has no valid schema_version (a positive integer).",
                                 hint=damaged, path=self.manifest_path)
        if m["schema_version"] > SCHEMA_VERSION:
            raise WorkspaceError(
                f"Workspace {self.root} has schema version {m['schema_version']}, newer than this gstalk "
                f"{__version__} understands ({SCHEMA_VERSION}).",
                hint="upgrade gstalk (pip install -U gstalk)", path=self.manifest_path)
        m.setdefault("stages", {})
        stages = m["stages"]
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise WorkspaceError(f"{self.manifest_path}: 'stages' is not a mapping of stage records.",
                                 hint=damaged, path=self.manifest_path)
        for name, rec in stages.items():
            kinds = {"status": str, "run_id": str, "config": dict, "summary": dict, "inputs": dict, "outputs": dict}
            bad = [k for k, t in kinds.items() if k in rec and not isinstance(rec[k], t)]
            if bad:
                raise WorkspaceError(f"{self.manifest_path}: stage '{name}' has a malformed '{bad[0]}'.",
                                     hint=damaged, path=self.manifest_path)
        if not isinstance(m.get("preset", ""), str) or isinstance(m.get("seed", 0), bool) \
                or not isinstance(m.get("seed", 0), int):
            raise WorkspaceError(f"{self.manifest_path}: 'preset' or 'seed' has the wrong type.",
                                 hint=damaged, path=self.manifest_path)
        self._manifest = m
        return m

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self.load()
        assert self._manifest is not None
        return self._manifest

    def save(self) -> None:
        """Write the manifest atomically."""
        write_json(self.manifest_path, self.manifest)

    # ----------------------------------------------------------------------- paths
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def preset(self) -> str:
        return self.manifest.get("preset", "cpu-quick")

    @property
    def seed(self) -> int:
        return int(self.manifest.get("seed", 0))

    # ----------------------------------------------------------------------- stages
    def stage(self, name: str) -> StageRecord:
        return StageRecord(name, self.manifest["stages"].get(name, {}))

    def require(self, stage: str) -> None:
        """Check that every stage ``stage`` reads is done and not stale.

        Raises:
            WorkspaceError: naming the missing/unfinished/stale stage and the command to run.
        """
        for dep in REQUIRES[stage]:
            rec = self.stage(dep)
            if rec.status != "done":
                state = "has not run" if rec.status == "missing" else f"is '{rec.status}' (not finished)"
                raise WorkspaceError(f"Stage '{dep}' {state} in workspace {self.root}; '{stage}' needs it.",
                                     hint=f"run `gstalk {dep} {self.root}` first")
            # A dependency re-run after one of *its* consumers is fine for us only if the
            # consumers we also read recorded the same run.
            for other in REQUIRES[stage]:
                orec = self.stage(other)
                seen = orec.data.get("inputs", {}).get(dep)
                if seen is not None and orec.status == "done" and seen != rec.run_id:
                    raise WorkspaceError(
                        f"Stage '{other}' in {self.root} is stale: '{dep}' was re-run after it.",
                        hint=f"re-run `gstalk {other} {self.root}`")

    def begin(self, stage: str, config: dict[str, Any]) -> dict[str, Any]:
        """Mark ``stage`` as running with ``config``; return its (new) record dict.

        A finished earlier run's record is kept under ``previous`` until the new run
        finishes, so that :meth:`fail` can give it back.
        """
        inputs = {dep: self.stage(dep).run_id for dep in REQUIRES.get(stage, ())}
        old = self.manifest["stages"].get(stage)
        rec = {
            "status": "running",
            "run_id": uuid.uuid4().hex,
            "config": config,
            "inputs": inputs,
            "outputs": {},
            "started": now_iso(),
            "versions": tool_versions(),
        }
        if old is not None and old.get("status") == "done":
            rec["previous"] = {k: v for k, v in old.items() if k not in ("previous", "last_failure")}
        self.manifest["stages"][stage] = rec
        self.save()
        return rec

    def finish(self, stage: str, *, outputs: list[str], summary: dict[str, Any], seconds: float,
               timings: dict[str, float] | None = None) -> None:
        """Mark ``stage`` done, recording a checksum of each output (files or folders)."""
        rec = self.manifest["stages"][stage]
        rec["outputs"] = {o: sha256_output(self.path(o)) for o in outputs}
        rec["summary"] = summary
        rec["seconds"] = round(seconds, 3)
        if timings:
            rec["timings"] = {k: round(v, 3) for k, v in timings.items()}
        rec["finished"] = now_iso()
        rec["status"] = "done"
        rec.pop("previous", None)
        self.save()

    def fail(self, stage: str, error: BaseException | str) -> bool:
        """Record that a run of ``stage`` failed, with a one-line reason (``error``, or the
        exception's message).

        A re-run that fails over a finished run whose outputs are all still there, with
        the checksums it recorded (the stages write their outputs atomically at the end),
        gives that run back: the stage stays ``done`` with the earlier run's record, and
        the failure is kept under ``last_failure`` (error, times, config), so what was
        built on it (render, eval) still works; an exception passed as ``error`` gets a note
        saying so (``add_note``; the CLI prints it below the error). Otherwise the stage is
        marked ``failed``.

        Best effort, never raises: it runs while another error propagates (often a full
        disk, which would also stop this write), and that error is the one to report. If the
        manifest cannot be written, it keeps saying ``running``, which ``gstalk check``
        reports as interrupted, with the same fix.

        Returns:
            True when the earlier run was given back (and the manifest says so on disk).
        """
        rec = self.manifest["stages"].get(stage)
        if rec is None:
            return False
        message = str(error) or type(error).__name__
        failure = {"error": message, "started": rec.get("started"), "finished": now_iso(),
                   "config": rec.get("config")}
        previous = rec.pop("previous", None)
        try:
            kept = previous is not None and bool(previous.get("outputs")) and not self.output_problems(previous)
        except OSError:
            kept = False
        if kept:
            self.manifest["stages"][stage] = {**previous, "last_failure": failure}
        else:
            rec.update(status="failed", error=message, finished=failure["finished"])
        try:
            self.save()
        except (OSError, GstalkError):
            return False
        if kept and isinstance(error, BaseException):
            error.add_note(f"The {stage} run that finished {previous.get('finished', '?')} is kept, its files "
                           "unchanged: what was built on it still works.")
        return kept

    def output_problems(self, rec: dict[str, Any]) -> list[str]:
        """What is wrong with the outputs a stage record lists (``rec["outputs"]``: relative
        path -> SHA-256): "PATH is missing" or "PATH changed since the stage wrote it", one
        line each; empty when all are as recorded.

        Raises:
            OSError: an output cannot be read.
        """
        bad = []
        for rel, digest in rec.get("outputs", {}).items():
            p = self.path(rel)
            if not p.exists():
                bad.append(f"{rel} is missing")
            elif sha256_output(p) != digest:
                bad.append(f"{rel} changed since the stage wrote it")
        return bad

    def is_current(self, stage: str) -> bool:
        """Whether ``stage`` is done, read the runs of the stages before it that are there now
        (not re-run since), and its recorded outputs are intact: e.g. an eval whose metrics
        still describe the current fine model. Judged from the manifest, not file times."""
        rec = self.stage(stage)
        if rec.status != "done":
            return False
        for dep in REQUIRES.get(stage, ()):
            if rec.data.get("inputs", {}).get(dep) != self.stage(dep).run_id:
                return False
        try:
            return not self.output_problems(rec.data)
        except OSError:
            return False

    # ----------------------------------------------------------------------- lock
    @contextlib.contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold an exclusive lock on the workspace while a stage runs.

        Raises:
            LockError: another process holds it (its pid and stage are named).
        """
        lock_path = self.root / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            _raise_os_error(exc, lock_path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise LockError(f"Workspace {self.root} is in use by {holder}.",
                                hint="wait for it to finish, or stop it, then re-run") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"gstalk {stage} (pid {os.getpid()})".encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


StageResult = dict[str, Any] | tuple[dict[str, Any], dict[str, float]]


def run_stage(ws: Workspace, name: str, config: dict[str, Any], fn: Callable[[], StageResult], *,
              started: float | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one stage the way every stage runs: hold the workspace lock, delete what a killed
    run left (``.tmp-*``), record the run as begun (config, inputs, versions), call ``fn``,
    and record it done with the checksums of its :data:`OUTPUTS` (or failed, giving back an
    intact earlier run, :meth:`Workspace.fail`).

    Args:
        ws: the workspace (its requirements already checked with :meth:`Workspace.require`,
            and bad input already refused: nothing is written before the lock).
        name: the stage (a key of :data:`OUTPUTS`).
        config: the stage's resolved config, as recorded (``gstalk.config.to_dict``).
        fn: does the work; returns the summary, or (summary, timings in seconds).
        started: ``time.perf_counter()`` when the stage started (default: now), for the
            recorded seconds.
        resume: record the stopped run this one continues (``resumed_from``).

    Returns:
        The summary.

    Raises:
        LockError: another process holds the workspace. Whatever ``fn`` raises.
    """
    t0 = time.perf_counter() if started is None else started
    with ws.lock(name):
        clean_temp(ws.path(name))
        prev = ws.stage(name)
        ws.begin(name, config)
        if resume and prev.run_id:  # keep the run id so the checkpoint is recognised
            ws.manifest["stages"][name]["resumed_from"] = prev.run_id
        try:
            result = fn()
        except BaseException as exc:
            ws.fail(name, exc)
            raise
        summary, timings = result if isinstance(result, tuple) else (result, None)
        ws.finish(name, outputs=list(OUTPUTS[name]), summary=summary, seconds=time.perf_counter() - t0,
                  timings=timings)
    return summary


def tool_versions() -> dict[str, str]:
    """Versions of gstalk, Python and the main libraries, for the manifest."""
    import numpy
    import torch

    return {
        "gstalk": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def find_workspace(start: str | Path | None = None) -> Path:
    """The workspace to use when none is given: ``start`` itself if it holds a manifest,
    else its single sub-folder that does.

    Raises:
        WorkspaceError: none or several candidates (the message lists them).
    """
    start = Path(start or os.getcwd())
    if (start / MANIFEST).exists():
        return start
    cands = sorted(p for p in start.iterdir() if (p / MANIFEST).is_file()) if start.is_dir() else []
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise WorkspaceError(f"No gstalk workspace in {start}.",
                             hint="pass the workspace folder, e.g. `gstalk render ws/ --audio speech.wav`")
    names = ", ".join(str(c) for c in cands)
    raise WorkspaceError(f"Several workspaces in {start}: {names}.", hint="pass the one to use")
