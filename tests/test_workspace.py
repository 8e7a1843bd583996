"""Workspace: atomic writes, manifest round trip, schema checks, stage requirements, lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gstalk.errors import LockError, WorkspaceError
from gstalk.workspace import SCHEMA_VERSION, Workspace, atomic_dir, atomic_write, find_workspace, read_json, write_json


def test_atomic_write_keeps_old_content_on_error(tmp_path):
    p = tmp_path / "f.json"
    write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as f:
            f.write('{"a": 2')  # half written
            raise RuntimeError("killed")
    assert read_json(p) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["f.json"]  # no temp file left


def test_atomic_dir_replaces_whole_folder(tmp_path):
    d = tmp_path / "frames"
    with atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(KeyError):
        with atomic_dir(d) as tmp:
            (tmp / "b.txt").write_text("2")
            raise KeyError("stop")
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]
    with atomic_dir(d) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["c.txt"]


def test_manifest_round_trip_and_stage_records(tmp_path):
    ws = Workspace.create(tmp_path / "ws", preset="test", seed=3, source={"path": "v.mp4"})
    ws.begin("extract", {"size": 64})
    (ws.path("extract")).mkdir()
    (ws.path("extract", "x.bin")).write_bytes(b"abc")
    ws.finish("extract", outputs=["extract/x.bin"], summary={"n_frames": 5}, seconds=1.5)
    again = Workspace.open(tmp_path / "ws")
    rec = again.stage("extract")
    assert rec.status == "done" and rec.config == {"size": 64} and rec.summary == {"n_frames": 5}
    # sha256 of b"abc"
    assert rec.data["outputs"]["extract/x.bin"].startswith("ba7816bf")
    assert again.seed == 3 and again.preset == "test"
    m = json.loads((tmp_path / "ws" / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path):
    ws = Workspace.create(tmp_path / "ws", preset="test", seed=0, source={})
    ws.manifest["schema_version"] = SCHEMA_VERSION + 1
    ws.save()
    with pytest.raises(WorkspaceError, match="newer than this gstalk"):
        Workspace.open(tmp_path / "ws")


def test_corrupt_manifest_names_the_file(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "manifest.json").write_text("{not json")
    with pytest.raises(WorkspaceError, match="manifest.json is not valid JSON"):
        Workspace.open(tmp_path / "ws")


def test_missing_and_stale_stages(tmp_path):
    ws = Workspace.create(tmp_path / "ws", preset="test", seed=0, source={})
    with pytest.raises(WorkspaceError, match="Stage 'extract' has not run") as e:
        ws.require("track")
    assert "gstalk extract" in e.value.hint
    for stage in ("extract", "track"):
        ws.begin(stage, {})
        ws.finish(stage, outputs=[], summary={}, seconds=0)
    ws.require("coarse")
    ws.begin("extract", {})  # extract re-run after track
    ws.finish("extract", outputs=[], summary={}, seconds=0)
    with pytest.raises(WorkspaceError, match="'track' .* is stale"):
        ws.require("coarse")


def test_running_stage_counts_as_unfinished(tmp_path):
    ws = Workspace.create(tmp_path / "ws", preset="test", seed=0, source={})
    ws.begin("extract", {})  # killed before finish
    with pytest.raises(WorkspaceError, match="is 'running'"):
        ws.require("track")


def test_a_failed_rerun_gives_back_the_finished_run_whose_files_are_intact(tmp_path):
    """A re-run that fails over a finished run leaves it usable (status done, same run id,
    so its consumers are not stale), with the failure recorded; if the failed run touched
    the earlier outputs, the stage is marked failed instead."""
    ws = Workspace.create(tmp_path / "ws", preset="test", seed=0, source={})
    ws.path("extract").mkdir()
    ws.path("extract", "x.bin").write_bytes(b"abc")
    for stage in ("extract", "track"):
        ws.begin(stage, {"size": 64})
        ws.finish(stage, outputs=["extract/x.bin"] if stage == "extract" else [], summary={}, seconds=0)
    first = ws.stage("extract").data
    ws.begin("extract", {"size": 128})
    assert ws.stage("extract").data["previous"]["run_id"] == first["run_id"]
    err = ValueError("bad frame 7")
    assert ws.fail("extract", err) is True
    again = Workspace.open(tmp_path / "ws")
    rec = again.stage("extract")
    assert rec.status == "done" and rec.run_id == first["run_id"] and rec.config == {"size": 64}
    assert rec.data["last_failure"]["error"] == "bad frame 7"
    assert rec.data["last_failure"]["config"] == {"size": 128} and "previous" not in rec.data
    assert "is kept, its files unchanged" in err.__notes__[0]
    again.require("coarse")  # track is not stale: it read the run that was kept
    from gstalk.check import check_workspace

    by = {f.stage: f for f in check_workspace(again)}
    assert by["extract"].status == "ok" and "a later re-run failed (bad frame 7)" in by["extract"].detail
    # a failed run that changed the earlier outputs: nothing to give back
    again.begin("extract", {"size": 128})
    again.path("extract", "x.bin").write_bytes(b"half")
    assert again.fail("extract", "killed") is False
    rec = Workspace.open(tmp_path / "ws").stage("extract")
    assert rec.status == "failed" and rec.data["error"] == "killed" and "previous" not in rec.data
    # a run that finishes drops the earlier record
    again.begin("extract", {})
    again.finish("extract", outputs=[], summary={}, seconds=0)
    assert "previous" not in Workspace.open(tmp_path / "ws").stage("extract").data


def test_lock_conflict_between_processes(tmp_path):
    ws = Workspace.create(tmp_path / "ws", preset="test", seed=0, source={})
    code = ("import sys, time; from gstalk.workspace import Workspace\n"
            "with Workspace.open(sys.argv[1]).lock('coarse'):\n print('locked', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=r"in use by gstalk coarse \(pid \d+\)"):
            with ws.lock("fine"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with ws.lock("fine"):  # released when the holder died
        pass


def test_find_workspace(tmp_path, monkeypatch):
    with pytest.raises(WorkspaceError, match="No gstalk workspace"):
        find_workspace(tmp_path)
    Workspace.create(tmp_path / "a", preset="test", seed=0, source={})
    assert find_workspace(tmp_path) == tmp_path / "a"
    assert find_workspace(tmp_path / "a") == tmp_path / "a"
    Workspace.create(tmp_path / "b", preset="test", seed=0, source={})
    with pytest.raises(WorkspaceError, match="Several workspaces"):
        find_workspace(tmp_path)
    monkeypatch.chdir(tmp_path / "b")
    assert find_workspace() == tmp_path / "b"


def test_unwritable_folder_gives_resource_error(tmp_path):
    from gstalk.errors import ResourceError

    if os.geteuid() == 0:
        pytest.skip("root can write to read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ResourceError):
        write_json(ro / "x.json", {})


def test_check_verifies_checksums_and_names_what_to_rerun(ws_copy):
    import json

    from typer.testing import CliRunner

    from gstalk.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(ws_copy), "--json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["ok"] and [s["status"] for s in data["stages"]] == ["ok"] * 4

    # flip one byte of a coarse output: coarse is reported, and it is what to re-run first
    ply = ws_copy / "coarse" / "point_cloud.ply"
    raw = bytearray(ply.read_bytes())
    raw[-1] ^= 0xFF
    ply.write_bytes(bytes(raw))
    (ws_copy / "track" / "background.png").unlink()
    bad = runner.invoke(app, ["check", str(ws_copy), "--json"])
    assert bad.exit_code == 4
    data = json.loads(bad.stdout)
    by = {s["stage"]: s for s in data["stages"]}
    assert by["track"]["status"] == "problem" and "background.png is missing" in by["track"]["detail"]
    assert by["coarse"]["status"] == "problem" and "point_cloud.ply changed" in by["coarse"]["detail"]
    assert by["extract"]["status"] == "ok" and by["fine"]["status"] == "ok"
    assert data["rerun"] == f"gstalk track {ws_copy}"


def test_check_reports_interrupted_and_stale_stages(ws_copy):
    from gstalk.check import check_workspace, first_fix
    from gstalk.workspace import Workspace

    ws = Workspace.open(ws_copy)
    ws.manifest["stages"]["coarse"]["run_id"] = "rerun"  # coarse re-run after fine read it
    ws.manifest["stages"]["fine"]["status"] = "running"
    ws.save()
    by = {f.stage: f for f in check_workspace(Workspace.open(ws_copy))}
    assert by["fine"].status == "problem" and "interrupted" in by["fine"].detail
    ws.manifest["stages"]["fine"]["status"] = "done"
    ws.save()
    found = check_workspace(Workspace.open(ws_copy))
    by = {f.stage: f for f in found}
    assert by["fine"].status == "problem" and "stale: 'coarse'" in by["fine"].detail
    assert first_fix(found) == f"gstalk fine {ws_copy}"
