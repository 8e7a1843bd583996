"""What a batch worker does with one job: call the stage functions as the CLI does, and
describe the outcome as a results record (:mod:`gstalk.batch.results`).

A job never raises: any error becomes a ``failed`` record with its one-line message (and,
for an error that is not a :class:`~gstalk.errors.GstalkError`, the traceback), so one bad
row fails alone. Avatars are loaded once per worker process and kept (``_AVATARS``), by
path on the local engine and by the bundle's id on Ray.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gstalk.avatar import Avatar

_AVATARS: dict[str, Avatar] = {}
_MAX_AVATARS = 8  # decoded avatars a worker keeps (each: its Gaussians and model, ~1-100 MB)


def init_worker(threads: int, die_with_parent: bool = True) -> None:
    """Set up a worker process: ``threads`` threads for torch/OpenMP, and (Linux) a SIGKILL
    when the batch driver dies, so a driver killed with kill -9 leaves no worker behind."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if die_with_parent:
        _die_with_parent()
    import torch

    torch.set_num_threads(threads)


def _die_with_parent() -> None:
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _remember(key: str, load: Callable[[], Avatar]) -> Avatar:
    a = _AVATARS.get(key)
    if a is None:
        a = load()
        if len(_AVATARS) >= _MAX_AVATARS:
            _AVATARS.pop(next(iter(_AVATARS)))
        _AVATARS[key] = a
    return a


def avatar_from_path(path: str) -> Avatar:
    """The avatar at ``path`` (workspace, bundle, unpacked bundle), loaded once per process."""
    from gstalk.avatar import load_avatar

    return _remember(f"path:{Path(path).resolve()}", lambda: load_avatar(path))


def run_job(payload: dict[str, Any], avatar: Callable[[], Avatar] | None = None) -> dict[str, Any]:
    """Run one job (:meth:`gstalk.batch.jobs.Job.payload`); returns its results record.

    Args:
        avatar: for a render job, a function giving its avatar (default: loaded from the
            row's path, :func:`avatar_from_path`).
    """
    t0 = time.perf_counter()
    spec = payload["spec"]
    rec: dict[str, Any] = {"row": payload["row"], "line": payload["line"], "kind": payload["kind"],
                           "output": spec.get("output") if payload["kind"] == "render" else spec.get("workspace"),
                           "key": payload["key"], "worker": f"{socket.gethostname()}:{os.getpid()}"}
    try:
        if payload["kind"] == "render":
            get = avatar if avatar is not None else (lambda: avatar_from_path(spec["avatar"]))
            rec.update(render_job(spec, get))
        else:
            rec.update(train_job(spec))
        rec.update(status="ok", error=None, exit_code=0)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the row's record
        from gstalk.errors import GstalkError

        if isinstance(exc, KeyboardInterrupt | SystemExit) and not isinstance(exc, GstalkError):
            raise
        rec.update(status="failed", error=str(exc) or type(exc).__name__,
                   exit_code=getattr(exc, "exit_code", 1))
        if not isinstance(exc, GstalkError):
            rec["error"] = f"{type(exc).__name__}: {rec['error']}"
            rec["traceback"] = traceback.format_exc(limit=-8)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def render_job(spec: dict[str, Any], avatar: Callable[[], Avatar]) -> dict[str, Any]:
    """``gstalk render AVATAR --audio A -o OUTPUT [options]`` for one row.

    Returns:
        output_sha256, output_bytes, frames, duration_s, fps (the render's).
    """
    from gstalk.config import RenderConfig
    from gstalk.stages.render import run_render
    from gstalk.workspace import sha256_output

    cfg = RenderConfig(pose=spec["pose"], background=spec["background"], alpha=spec["alpha"], size=spec["size"],
                       blink=spec["blink"], raster=spec["raster"], device=spec.get("device") or "auto",
                       articulation_gain=spec.get("articulation_gain"))
    s = run_render(avatar(), spec["audio"], spec["output"], cfg)
    out = Path(s["output"])
    return {"output": str(out), "output_sha256": sha256_output(out),
            "output_bytes": out.stat().st_size if out.is_file() else None, "frames": s["frames"],
            "duration_s": round(s["duration_s"], 3), "fps": round(s["fps"], 2)}


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """``gstalk extract`` ... ``fine`` (and ``eval``, ``export``) for one video, as ``gstalk
    run`` does, continuing a workspace where an earlier (killed) job left it: a stage that is
    done, intact and not stale, with the same video, speech file, preset, seed (and model, for
    fine), is kept; an interrupted coarse or fine stage with a checkpoint resumes.

    Returns:
        workspace, fine_run_id, stages_run, eval (psnr, mouth_psnr, ...), bundle, bundle_sha256.
    """
    from gstalk.check import check_workspace
    from gstalk.config import get_preset, override
    from gstalk.errors import UsageError, WorkspaceError
    from gstalk.stages.coarse import run_coarse
    from gstalk.stages.extract import run_extract
    from gstalk.stages.fine import run_fine
    from gstalk.stages.track import run_track
    from gstalk.workspace import CHECKPOINTS, MANIFEST, Workspace, sha256_file, sha256_output

    p = get_preset(spec["preset"])
    root = Path(spec["workspace"])
    raster, device = spec["raster"], spec.get("device") or "auto"
    fine_cfg = override(p.fine, model=spec["model"], raster=raster, device=device)
    if (root / MANIFEST).is_file():  # continue this video's workspace; never overwrite another's
        ws = Workspace.open(root)
        source = ws.manifest.get("source", {})
        have = (source.get("sha256"), (source.get("speech") or {}).get("sha256"), ws.preset, ws.seed)
        want = (sha256_file(spec["video"]), sha256_file(spec["speech"]) if spec.get("speech") else None, p.name,
                spec["seed"])
        names = ("video", "speech", "preset", "seed")
        diff = [k for k, a, b in zip(names, have, want) if a != b]
        if diff:
            shown = ("video sha256", "speech sha256", "preset", "seed")
            raise UsageError(f"Workspace {root} was made from another {' and '.join(diff)} "
                             f"({', '.join(f'{k} {a}' for k, a in zip(shown, have))}).",
                             hint="give this row its own workspace column, or delete that folder")
    ran: list[str] = []
    stages: list[tuple[str, Callable[[bool], Any]]] = [
        ("extract", lambda resume: run_extract(spec["video"], root, p.extract, preset=p.name, seed=spec["seed"],
                                               speech=spec.get("speech"))),
        ("track", lambda resume: run_track(str(root), p.track)),
        ("coarse", lambda resume: run_coarse(str(root), override(p.coarse, raster=raster, device=device),
                                             resume=resume)),
        ("fine", lambda resume: run_fine(str(root), fine_cfg, resume=resume)),
    ]
    for name, fn in stages:
        ok: dict[str, bool] = {}
        resume = False
        if (root / MANIFEST).is_file():
            ws = Workspace.open(root)
            ok = {f.stage: f.status == "ok" for f in check_workspace(ws)}
            if name == "fine" and ws.stage("fine").config.get("model") != spec["model"]:
                ok["fine"] = False
            resume = name in CHECKPOINTS and ws.path(CHECKPOINTS[name]).is_file() and ws.stage(name).status != "done"
        if not ran and ok.get(name):
            continue  # kept: done, intact, not stale, and nothing before it re-ran
        try:
            fn(resume)
        except WorkspaceError:
            if not resume:
                raise
            fn(False)  # a checkpoint made with other settings: start the stage again
        ran.append(name)
    ws = Workspace.open(root)
    out: dict[str, Any] = {"workspace": str(root), "fine_run_id": ws.stage("fine").run_id, "stages_run": ran}
    if spec["eval"]:
        from gstalk.config import EvalConfig
        from gstalk.stages.evaluate import run_eval

        m = run_eval(str(root), EvalConfig(raster=raster, device=device))
        out["eval"] = {k: m.get(k) for k in ("psnr", "ssim", "mouth_psnr", "lmd")}
    if spec.get("bundle"):
        from gstalk.bundle import export_bundle

        b = export_bundle(root, spec["bundle"])
        out["bundle"] = b["bundle"]
        out["bundle_sha256"] = sha256_output(b["bundle"])
    return out


def run_job_ray(payload: dict[str, Any], threads: int, avatar_key: str | None, avatar_ref: list[Any] | None
                ) -> dict[str, Any]:
    """A job on a Ray worker (the body of the remote task). ``avatar_ref``: ``[ObjectRef]`` of
    the avatar's bundle bytes (or of its path, for a workspace that cannot be bundled) in the
    object store, wrapped in a list so Ray hands over the reference, fetched only when this
    worker does not hold the avatar yet (``avatar_key``)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

    def avatar() -> Avatar:
        assert avatar_key is not None and avatar_ref is not None

        def load() -> Avatar:
            import ray

            from gstalk.bundle import read_bundle_bytes

            kind, value = ray.get(avatar_ref[0])
            if kind == "path":
                from gstalk.avatar import load_avatar

                return load_avatar(value)
            return read_bundle_bytes(value, payload["spec"]["avatar"]).avatar()

        return _remember(avatar_key, load)

    return run_job(payload, avatar if payload["kind"] == "render" else None)
