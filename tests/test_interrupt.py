"""kill -9 in the middle of each stage, then the command again (issue 9).

Each test runs ``python -m gstalk STAGE`` as a subprocess on a small synthetic workspace,
SIGKILLs it while the stage works, re-runs it, and checks that it completes, that ``gstalk
check`` verifies the workspace, and that the result equals an uninterrupted run's:

- extract / track: killed while writing frames / masks; re-run from the start (the half-written
  folder is a temp folder, discarded); outputs byte-identical (manifest checksums).
- coarse: killed at a random moment of the stage (a fraction of an uninterrupted run's time,
  drawn with a fixed seed); 6 iterations write no checkpoint, so the same command redoes it; same seed -> the
  same Gaussians, tensor for tensor.
- fine: killed after its first checkpoint; ``gstalk check`` says to add ``--resume``; the
  resumed run ends with the uninterrupted run's parameters, tensor for tensor.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from gstalk.tensorio import load_tensors
from gstalk.testing.corpus import record
from gstalk.workspace import STAGES

pytestmark = pytest.mark.slow


def gstalk_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "gstalk", *(str(a) for a in args)]


def run_and_kill(cmd: list[str], ready: Callable[[], bool], timeout_s: float = 300.0,
                 may_finish: bool = False) -> bool:
    """Start ``cmd``, poll ``ready()`` every 10 ms, SIGKILL the process as soon as it is
    true. Returns True when killed; if the process ends on its own first: False with
    ``may_finish``, else the test fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                if may_finish:
                    return False
                pytest.fail(f"{' '.join(cmd)} ended (code {proc.returncode}) before it could be killed")
            if time.monotonic() - t0 > timeout_s:
                pytest.fail(f"{' '.join(cmd)}: the kill condition never came")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return True


def run_ok(cmd: list[str]) -> float:
    """Run ``cmd`` to the end (asserting success); seconds from the stage's start
    (manifest ``running``) to the process's end are not known here, so: wall seconds."""
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return time.monotonic() - t


def status(ws: Path, stage: str) -> str:
    try:
        return json.loads((ws / "manifest.json").read_text())["stages"].get(stage, {}).get("status", "missing")
    except (FileNotFoundError, json.JSONDecodeError):
        return "missing"


def checked(ws: Path) -> dict[str, dict]:
    """``gstalk check --json`` (asserting exit 0): stage -> finding."""
    r = subprocess.run(gstalk_cmd("check", ws, "--json"), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return {s["stage"]: s for s in json.loads(r.stdout)["stages"]}


def before_stage(trained_ws: Path, dst: Path, stage: str) -> Path:
    """A copy of the trained workspace as it was before ``stage`` ran: later stages'
    records and folders removed."""
    shutil.copytree(trained_ws, dst)
    later = STAGES[STAGES.index(stage):]
    m = json.loads((dst / "manifest.json").read_text())
    for s in later:
        m["stages"].pop(s, None)
        shutil.rmtree(dst / s, ignore_errors=True)
    for extra in ("renders", "eval"):
        shutil.rmtree(dst / extra, ignore_errors=True)
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def outputs(ws: Path, stage: str) -> dict[str, str]:
    return json.loads((ws / "manifest.json").read_text())["stages"][stage]["outputs"]


def assert_same_tensors(a: Path, b: Path) -> None:
    """Every tensor of ``a`` equals ``b``'s bit for bit; a failure lists each tensor that
    differs, by how much and in how many elements (a rounding-sized difference says the
    arithmetic was not reproducible; a large one that the run started from another state)."""
    ta, _ = load_tensors(a)
    tb, _ = load_tensors(b)
    assert ta.keys() == tb.keys()
    differ = {}
    for k in ta:
        if ta[k].shape != tb[k].shape:
            differ[k] = f"shape {tuple(ta[k].shape)} != {tuple(tb[k].shape)}"
        elif not torch.equal(ta[k], tb[k]):
            d = (ta[k].double() - tb[k].double()).abs()
            differ[k] = f"max |diff| {float(d.max()):.3g} in {int((d > 0).sum())} of {d.numel()} elements"
    assert not differ, f"{a} != {b}: {differ}"


def test_extract_killed_while_writing_frames(mannequin_clip, trained_ws, tmp_path):
    ws = tmp_path / "ws"
    cmd = gstalk_cmd("extract", mannequin_clip.path, "-w", ws, "--preset", "test", "--quiet")
    run_and_kill(cmd, lambda: len(list(ws.glob("extract/.tmp-frames.*/*.png"))) >= 10)
    assert status(ws, "extract") == "running" and not (ws / "extract" / "frames").exists()
    run_ok(cmd)
    assert not list((ws / "extract").glob(".tmp-*"))
    assert checked(ws)["extract"]["status"] == "ok"
    assert outputs(ws, "extract") == outputs(trained_ws, "extract")  # == the fixture's uninterrupted run
    record("kill -9", "extract, killed while writing frames (10 of 75 written)", "gstalk extract clip.mp4", 0,
           "re-run: redone from the start (the half-written frames were a temp folder)",
           "yes: check ok; outputs byte-identical to an uninterrupted run")


def test_track_killed_while_writing_masks(trained_ws, tmp_path):
    ws = before_stage(trained_ws, tmp_path / "ws", "track")
    cmd = gstalk_cmd("track", ws, "--quiet")
    run_and_kill(cmd, lambda: len(list(ws.glob("track/.tmp-masks.*/*.png"))) >= 10)
    assert status(ws, "track") == "running"
    assert checked_problem(ws, "track") == f"gstalk track {ws}"  # and extract is still verified:
    assert json.loads(subprocess.run(gstalk_cmd("check", ws, "--json"), capture_output=True,
                                     text=True).stdout)["stages"][0]["status"] == "ok"
    run_ok(cmd)
    assert [checked(ws)[s]["status"] for s in ("extract", "track")] == ["ok", "ok"]
    assert outputs(ws, "track") == outputs(trained_ws, "track")
    record("kill -9", "track, killed while writing masks (10 of 75 written)", "gstalk track ws", 0,
           "re-run: redone from the start; extract stayed verified meanwhile",
           "yes: check ok; outputs byte-identical to an uninterrupted run")


COARSE_ARGS = ("--iterations", "6", "--quiet")


def test_coarse_killed_at_a_random_moment_redoes_to_the_same_result(trained_ws, tmp_path):
    ref = before_stage(trained_ws, tmp_path / "ref", "coarse")
    # the uninterrupted run, timed from the stage's start to its end (manifest running -> done)
    proc = subprocess.Popen(gstalk_cmd("coarse", ref, *COARSE_ARGS), stderr=subprocess.PIPE, text=True)
    t_run = t_done = None
    while proc.poll() is None:
        st = status(ref, "coarse")
        if st == "running" and t_run is None:
            t_run = time.monotonic()
        if st == "done" and t_done is None:
            t_done = time.monotonic()
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert t_run is not None
    stage_s = (t_done or time.monotonic()) - t_run
    # a reproducible "random moment" (fixed seed); if a busy machine made this run faster than
    # the reference and it finished first, try again earlier
    frac = float(np.random.default_rng(9).uniform(0.2, 0.6))
    cmd: list[str] = []
    for attempt, f in enumerate((frac, frac / 2, frac / 4)):
        ws = before_stage(trained_ws, tmp_path / f"ws{attempt}", "coarse")

        def moment(ws: Path = ws, after_s: float = f * stage_s, started: list[float] = []) -> bool:  # noqa: B006
            if not started:  # the stage started: the clock starts
                if status(ws, "coarse") == "running":
                    started.append(time.monotonic())
                return False
            return time.monotonic() - started[0] >= after_s

        cmd = gstalk_cmd("coarse", ws, *COARSE_ARGS)
        if run_and_kill(cmd, moment, may_finish=True) and status(ws, "coarse") == "running":
            frac = f
            break
    else:
        pytest.fail("coarse always finished before the kill")
    assert checked_problem(ws, "coarse") == f"gstalk coarse {ws}"
    run_ok(cmd)  # the same command: 6 iterations wrote no checkpoint, it starts again
    assert [checked(ws)[s]["status"] for s in ("extract", "track", "coarse")] == ["ok"] * 3
    assert_same_tensors(ws / "coarse" / "gaussians.safetensors", ref / "coarse" / "gaussians.safetensors")
    record("kill -9", f"coarse, killed at {frac:.0%} of the stage's time", "gstalk coarse ws --iterations 6", 0,
           "re-run: redone from the start (6 iterations: no checkpoint yet)",
           "yes: check ok; Gaussians tensor-for-tensor equal to an uninterrupted run (same seed)")


def checked_problem(ws: Path, stage: str) -> str:
    """``gstalk check`` of a workspace with a problem (exit 4): the fix it names for ``stage``."""
    r = subprocess.run(gstalk_cmd("check", ws, "--json"), capture_output=True, text=True)
    assert r.returncode == 4, r.stdout + r.stderr
    found = {s["stage"]: s for s in json.loads(r.stdout)["stages"]}
    assert found[stage]["status"] == "problem"
    return found[stage]["fix"]


FINE_ARGS = ("--iterations", "8", "--conditioning", "audio", "--set", "checkpoint_every=2", "--quiet")


def test_fine_killed_after_a_checkpoint_resumes_to_the_same_result(trained_ws, tmp_path):
    ref = before_stage(trained_ws, tmp_path / "ref", "fine")
    ws = before_stage(trained_ws, tmp_path / "ws", "fine")
    run_ok(gstalk_cmd("fine", ref, *FINE_ARGS))
    cmd = gstalk_cmd("fine", ws, *FINE_ARGS)
    run_and_kill(cmd, lambda: (ws / "fine" / "checkpoint.safetensors").exists())
    assert status(ws, "fine") == "running"
    fix = checked_problem(ws, "fine")
    assert fix == f"gstalk fine {ws} --resume"
    run_ok(cmd + ["--resume"])
    assert [checked(ws)[s]["status"] for s in STAGES] == ["ok"] * 4
    assert not (ws / "fine" / "checkpoint.safetensors").exists()
    assert_same_tensors(ws / "fine" / "model.safetensors", ref / "fine" / "model.safetensors")
    record("kill -9", "fine, killed after its first checkpoint", "gstalk fine ws --iterations 8 ... --resume", 0,
           "check: `re-run first: gstalk fine ws --resume`; resumed from the checkpoint",
           "yes: check ok; model tensor-for-tensor equal to an uninterrupted run (same seed)")
