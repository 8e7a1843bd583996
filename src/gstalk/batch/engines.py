"""Where batch jobs run: ``local`` (worker processes on this machine) or ``ray`` (a Ray cluster).

Both take the jobs to run and two callbacks: ``started(job)`` when a job is handed to a
worker and ``finished(job, record)`` when its results record is back (the driver appends it
to the results file at once). Neither schedules on its own beyond that: the local engine
keeps ``workers`` jobs running, each worker with ``threads`` threads; Ray places each task
where its declared resources (``num_cpus`` = threads, ``num_gpus``) are free.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gstalk.batch.jobs import Job
from gstalk.errors import DependencyError, GstalkError, UsageError

Started = Callable[[Job], None]
Finished = Callable[[Job, dict[str, Any]], None]
ENGINES = ("local", "ray")


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def plan_workers(workers: int | None, threads: int | None, cores: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for the local engine: by default one worker per core with
    one thread each; a given ``workers`` shares the cores out; a given ``threads`` sets how
    many workers fit.

    Raises:
        UsageError: a count below 1.
    """
    cores = cores or cpu_count()
    for name, v in (("--workers", workers), ("--threads", threads)):
        if v is not None and v < 1:
            raise UsageError(f"{name} {v} must be at least 1.")
    if workers is None and threads is None:
        return cores, 1
    if workers is None:
        assert threads is not None
        return max(1, cores // threads), threads
    return workers, threads if threads is not None else max(1, cores // workers)


def failure(job: Job, message: str, exit_code: int = 1) -> dict[str, Any]:
    """A ``failed`` record for a job that did not run or whose worker died."""
    return {"row": job.row, "line": job.line, "kind": job.kind, "status": "failed", "output": job.output,
            "seconds": 0.0, "error": message, "exit_code": exit_code, "key": job.key}


class LocalEngine:
    """Worker processes on this machine (``spawn``ed, so each starts clean, and killed with
    the driver). At most ``workers`` jobs run at once, so a driver killed with kill -9 loses
    at most those.

    Args:
        workers: worker processes.
        threads: torch/OpenMP threads in each.
    """

    name = "local"

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads

    def describe(self) -> str:
        return f"local engine, {self.workers} worker(s) x {self.threads} thread(s)"

    def capacity(self) -> int:
        return self.workers

    def run(self, jobs: list[Job], started: Started, finished: Finished, tick: Callable[[], None]) -> None:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        from gstalk.batch.work import init_worker, run_job

        pending = deque(jobs)
        ctx = mp.get_context("spawn")

        def new_pool() -> ProcessPoolExecutor:
            return ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=init_worker,
                                       initargs=(self.threads,))

        pool = new_pool()
        running: dict[Any, Job] = {}
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    job = pending.popleft()
                    try:
                        fut = pool.submit(run_job, job.payload())
                    except BrokenProcessPool:
                        pending.appendleft(job)
                        pool = new_pool()
                        continue
                    running[fut] = job
                    started(job)
                done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    job = running.pop(fut)
                    try:
                        rec = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        rec = failure(job, "the worker process died while running this job (killed, or out of "
                                           "memory?)")
                    except Exception as exc:  # noqa: BLE001 - e.g. a record that did not pickle
                        rec = failure(job, f"{type(exc).__name__}: {exc}")
                    finished(job, rec)
                if broken:
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = new_pool()
                tick()
        finally:
            pool.shutdown(wait=not running, cancel_futures=True)


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        DependencyError: Ray is not installed (the message names the extra).
    """
    try:
        import ray
    except ImportError:
        raise DependencyError("The ray engine needs Ray, which is not installed.",
                              hint="pip install 'gstalk[ray]' (or use --engine local)") from None
    return ray


class RayEngine:
    """Jobs as Ray tasks, each declaring ``num_cpus=threads`` and ``num_gpus=gpus``.

    Each avatar the render jobs use is put into the object store once (as its bundle's
    bytes: a workspace is packed in memory; one trained without the torso field, which
    cannot be bundled, goes as its path and must be on storage the workers share) and
    shared by those jobs; a worker decodes it once and keeps it. Outputs are written by the
    workers to the paths the rows name: on a real cluster that is shared storage
    (docs/batch.md).

    Args:
        address: the cluster to join (``ray.init(address=...)``, e.g. ``auto`` or
            ``ray://head:10001``); None starts a local one (or uses the one this process has
            started already).
        threads: CPUs (and torch threads) per job.
        gpus: GPUs per job (0 for none; fractions share a GPU).
        max_retries: times Ray re-runs a task whose worker or node died.
    """

    name = "ray"

    def __init__(self, address: str | None, threads: int, gpus: float = 0.0, max_retries: int = 1):
        if gpus < 0:
            raise UsageError(f"--gpus-per-job {gpus} must be 0 or more.")
        self.address, self.threads, self.gpus, self.max_retries = address, threads, gpus, max_retries
        self.ray = import_ray()
        self._started_ray = False
        self._capacity = 1

    def describe(self) -> str:
        return (f"ray engine ({self.address or 'local cluster'}), {self.threads} CPU(s)"
                + (f" + {self.gpus:g} GPU(s)" if self.gpus else "") + " per job")

    def connect(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
                                  "configure_logging": True}
            try:
                ray.init(address=self.address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise GstalkError(f"Cannot connect to the Ray cluster at {self.address or 'a new local cluster'}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.",
                                  hint="start it first (`ray start --head`) and give --address, or use "
                                       "--engine local") from None
            self._started_ray = True
        cpus = ray.cluster_resources().get("CPU", 1.0)
        self._capacity = max(1, int(cpus // self.threads))

    def capacity(self) -> int:
        return self._capacity

    def close(self) -> None:
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    def _put_avatars(self, jobs: list[Job]) -> tuple[dict[str, tuple[str, Any]], dict[str, GstalkError]]:
        """Each distinct avatar of the render jobs into the object store: path -> (key, ref)."""
        from gstalk.avatar import is_bundle_path
        from gstalk.bundle import read_bundle, read_bundle_bytes, workspace_bundle_bytes
        from gstalk.tensorio import read_metadata
        from gstalk.workspace import FINE_MODEL, Workspace

        refs: dict[str, tuple[str, Any]] = {}
        errors: dict[str, GstalkError] = {}
        for job in jobs:
            path = job.spec.get("avatar") if job.kind == "render" else None
            if path is None or path in refs or path in errors:
                continue
            try:
                if is_bundle_path(path):
                    b = read_bundle(path)  # verified here: a damaged bundle fails its rows before any task
                    value: tuple[str, Any] = ("bundle", b.to_bytes())
                    key = f"bundle:{b.sha256}"
                else:
                    ws = Workspace.open(path)
                    ws.require("render")
                    spec = (read_metadata(ws.path(FINE_MODEL)) or {}).get("spec", {})
                    if not spec.get("torso"):  # no torso field: cannot be bundled, read on shared storage
                        value = ("path", str(Path(path).resolve()))
                        key = f"path:{Path(path).resolve()}:{ws.stage('fine').run_id}"
                    else:
                        data = workspace_bundle_bytes(ws)
                        value = ("bundle", data)
                        key = f"bundle:{read_bundle_bytes(data, path).sha256}"
                refs[path] = (key, self.ray.put(value))
            except GstalkError as exc:
                errors[path] = exc
        return refs, errors

    def run(self, jobs: list[Job], started: Started, finished: Finished, tick: Callable[[], None]) -> None:
        from gstalk.batch.work import run_job_ray

        ray = self.ray
        self.connect()
        refs, errors = self._put_avatars(jobs)
        task = ray.remote(run_job_ray).options(num_cpus=self.threads, num_gpus=self.gpus,
                                               max_retries=self.max_retries)
        pending = deque(jobs)
        inflight: dict[Any, Job] = {}
        window = 2 * self._capacity  # queued beyond the running ones: the cluster never waits on the driver
        try:
            while pending or inflight:
                while pending and len(inflight) < window:
                    job = pending.popleft()
                    avatar = job.spec.get("avatar") if job.kind == "render" else None
                    if avatar is not None and avatar in errors:
                        e = errors[avatar]
                        finished(job, failure(job, str(e), e.exit_code))
                        continue
                    key, ref = refs[avatar] if avatar is not None else (None, None)
                    inflight[task.remote(job.payload(), self.threads, key, [ref] if ref is not None else None)] = job
                    started(job)
                if not inflight:
                    break
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                for r in done:
                    job = inflight.pop(r)
                    try:
                        rec = ray.get(r)
                    except Exception as exc:  # noqa: BLE001 - a worker or node died, the task was cancelled, ...
                        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                        rec = failure(job, f"Ray task failed ({type(exc).__name__}): {msg}")
                    finished(job, rec)
                tick()
        finally:
            for r in inflight:  # interrupted (Ctrl-C): stop what this batch queued on the cluster
                try:
                    ray.cancel(r, force=True)
                except Exception:  # noqa: BLE001, S110 - best effort while another error propagates
                    pass


def make_engine(name: str, *, workers: int | None = None, threads: int | None = None, address: str | None = None,
                gpus: float = 0.0) -> LocalEngine | RayEngine:
    """The engine called ``name`` (:data:`ENGINES`).

    Raises:
        UsageError: an unknown engine, or options that do not belong to it.
        DependencyError: ``ray`` without Ray installed.
    """
    if name == "local":
        if address is not None:
            raise UsageError("--address is for --engine ray.", hint="drop --address, or add --engine ray")
        if gpus:
            raise UsageError("--gpus-per-job is for --engine ray.", hint="drop it, or add --engine ray")
        w, t = plan_workers(workers, threads)
        return LocalEngine(w, t)
    if name == "ray":
        if workers is not None:
            raise UsageError("--workers is for --engine local; Ray runs as many jobs as the cluster's CPUs allow.",
                             hint="set the CPUs per job with --threads")
        if threads is not None and threads < 1:
            raise UsageError(f"--threads {threads} must be at least 1.")
        return RayEngine(address, threads or 1, gpus)
    raise UsageError(f"Unknown --engine '{name}'.", hint=f"use one of: {', '.join(ENGINES)}")
