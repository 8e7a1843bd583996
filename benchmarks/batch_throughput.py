"""Jobs per minute of ``gstalk batch render`` against serial ``gstalk render``, and Ray's overhead.

    python benchmarks/batch_throughput.py AVATAR SPEECH.wav [--jobs 20] [--seconds 3] [--json]

Cuts ``--jobs`` clips of ``--seconds`` from SPEECH (at different offsets) and renders each
with AVATAR (a workspace or a bundle) three ways, timing the wall clock of each:

- ``serial``: one ``python -m gstalk render`` command per clip, one after the other (what a
  shell loop does: each command starts Python, loads the avatar, renders, encodes);
- ``local``: ``python -m gstalk batch render jobs.csv`` (default workers: one per core);
- ``ray``: the same with ``--engine ray``, which starts a local Ray cluster (its start-up
  is measured apart, from a bare ``ray.init()``/``ray.shutdown()``).

Also: the round trip of an empty Ray task (100 of them, one after the other, on a warm
cluster), and, per engine, the mean seconds a job spends inside its worker (from the
results file), so the overhead per job = wall x parallel slots / jobs - that mean.
Checks that the three sets of outputs decode to the same frames. Prints a table or JSON, with
the machine's load average before and after (the numbers are noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cut(speech: Path, folder: Path, n: int, seconds: float) -> list[Path]:
    import soundfile as sf

    samples, sr = sf.read(str(speech), dtype="float32")
    if samples.ndim > 1:
        samples = samples.mean(1)
    length = int(seconds * sr)
    room = max(1, samples.size - length)
    out = []
    for i in range(n):
        start = int(i * room / max(n, 1)) % room
        p = folder / f"clip{i:02d}.wav"
        sf.write(p, samples[start:start + length], sr)
        out.append(p)
    return out


def _decoded(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return time.perf_counter() - t


def _mean_job_seconds(results: Path) -> float:
    recs = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    ok = [r["seconds"] for r in recs if r.get("status") == "ok"]
    return float(np.mean(ok)) if ok else float("nan")


def _ray_numbers(cpus: int) -> dict[str, float]:
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start_s = time.perf_counter() - t

    @ray.remote(num_cpus=1)
    def noop(x: int) -> int:
        return x

    ray.get(noop.remote(0))  # a worker up
    t = time.perf_counter()
    for i in range(100):
        ray.get(noop.remote(i))
    rtt = (time.perf_counter() - t) / 100
    t = time.perf_counter()
    ray.shutdown()
    return {"ray_start_s": start_s, "ray_shutdown_s": time.perf_counter() - t, "ray_noop_task_ms": rtt * 1000}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("avatar")
    ap.add_argument("speech")
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--engines", default="serial,local,ray")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    engines = a.engines.split(",")
    a.avatar = str(Path(a.avatar).resolve())  # the jobs file lies in a temporary folder
    cores = len(os.sched_getaffinity(0))
    load0 = os.getloadavg()
    out: dict[str, object] = {"jobs": a.jobs, "seconds_of_speech_each": a.seconds, "cores": cores,
                              "avatar": a.avatar}
    with tempfile.TemporaryDirectory(prefix="gstalk-batch-bench-") as tmp:
        d = Path(tmp)
        clips = _cut(Path(a.speech), d, a.jobs, a.seconds)
        py = [sys.executable, "-m", "gstalk"]
        walls: dict[str, float] = {}
        if "serial" in engines:
            walls["serial"] = sum(_run(py + ["render", a.avatar, "--audio", str(c), "-o",
                                             str(d / "serial" / f"{c.stem}.mp4"), "--quiet"]) for c in clips)
        for eng in ("local", "ray"):
            if eng not in engines:
                continue
            jobs = d / f"{eng}.csv"
            jobs.write_text("avatar,audio,output\n" + "".join(f"{a.avatar},{c},{d / eng / (c.stem + '.mp4')}\n"
                                                              for c in clips))
            walls[eng] = _run(py + ["batch", "render", str(jobs), "--engine", eng, "--quiet"])
            out[f"{eng}_mean_job_s"] = _mean_job_seconds(d / f"{eng}.results.jsonl")
        if "ray" in engines:
            out.update(_ray_numbers(cores))
            out["ray_wall_without_start_s"] = walls["ray"] - out["ray_start_s"] - out["ray_shutdown_s"]
            out["ray_overhead_per_job_s"] = out["ray_wall_without_start_s"] * cores / a.jobs - out["ray_mean_job_s"]
        if "local" in engines:
            out["local_overhead_per_job_s"] = walls["local"] * cores / a.jobs - out["local_mean_job_s"]
        for k, w in walls.items():
            out[f"{k}_wall_s"] = w
            out[f"{k}_jobs_per_min"] = a.jobs / w * 60.0
        sets = [k for k in ("serial", "local", "ray") if k in walls]
        same = all(np.array_equal(_decoded(d / sets[0] / f"{c.stem}.mp4"), _decoded(d / k / f"{c.stem}.mp4"))
                   for c in clips for k in sets[1:])
        out["outputs_equal"] = same
    out["load_before"], out["load_after"] = load0, os.getloadavg()
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
