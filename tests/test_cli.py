"""The command line: help, exit codes, one-line errors, stdout for pipelines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gstalk.cli import app

runner = CliRunner()


def test_help_lists_every_stage():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("extract", "track", "coarse", "fine", "render", "eval", "run"):
        assert cmd in r.output
    for cmd in ("extract", "track", "coarse", "fine", "render", "eval", "run"):
        sub = runner.invoke(app, [cmd, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output and "--quiet" in sub.output


def test_version():
    from gstalk import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


@pytest.mark.slow
@pytest.mark.parametrize("content, code, message", [
    (None, 3, "does not exist"),
    (b"", 3, "is empty"),
    (b"not a video at all\n" * 50, 3, "not a media file"),
])
def test_bad_video_inputs(tmp_path, content, code, message):
    v = tmp_path / "clip.mp4"
    if content is not None:
        v.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "gstalk", "extract", str(v), "-w", str(tmp_path / "ws")],
                       capture_output=True, text=True)
    assert r.returncode == code
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "ws").exists()


def test_stage_out_of_order_and_missing_workspace(tmp_path):
    r = runner.invoke(app, ["coarse", str(tmp_path / "nope")])
    assert r.exit_code == 4
    from gstalk.workspace import Workspace

    Workspace.create(tmp_path / "ws", preset="test", seed=0, source={})
    r = runner.invoke(app, ["fine", str(tmp_path / "ws")])
    assert r.exit_code == 4 and "Stage 'extract' has not run" in r.output


def test_unknown_preset_is_a_usage_error(tmp_path):
    r = runner.invoke(app, ["extract", str(tmp_path / "v.mp4"), "--preset", "fast"])
    assert r.exit_code == 2 and "Unknown preset 'fast'" in r.output


@pytest.mark.slow
def test_track_prints_workspace_for_pipelines(ws_copy):
    # re-running a finished stage is allowed, and stdout carries the workspace path and
    # nothing else (progress goes to stderr), so `gstalk extract v.mp4 | xargs gstalk track` works
    r = subprocess.run([sys.executable, "-m", "gstalk", "track", str(ws_copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ws_copy}\n"
    from gstalk.workspace import Workspace

    assert Workspace.open(ws_copy).stage("track").status == "done"


@pytest.mark.slow
def test_eval_json_prints_the_metrics_on_stdout(ws_copy):
    r = subprocess.run([sys.executable, "-m", "gstalk", "eval", str(ws_copy), "--json", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert {"psnr", "ssim", "mouth_psnr"} <= set(m) and "coarse" in m["baselines"]


def test_doctor_reports_every_check_as_json():
    import json

    r = runner.invoke(app, ["doctor", "--json"])
    data = json.loads(r.output)
    names = [c["name"] for c in data["checks"]]
    assert {"python", "torch", "cuda", "ffmpeg", "landmark model", "rasterizer", "disk"} <= set(names)
    assert all(c["status"] in ("ok", "warn", "fail") for c in data["checks"])
    assert data["ok"] == (r.exit_code == 0)
    assert all(c["fix"] for c in data["checks"] if c["status"] != "ok")  # every problem names its fix
    torch_check = next(c for c in data["checks"] if c["name"] == "torch")
    import torch

    assert torch.__version__ in torch_check["detail"]


def test_doctor_turns_a_crashing_check_into_a_fail_line():
    from gstalk.doctor import Check, run_checks

    def check_boom() -> Check:
        raise RuntimeError("kaputt")

    def check_fine() -> Check:
        return Check("fine", "ok", "yes")

    out = run_checks((check_boom, check_fine))
    assert [c.status for c in out] == ["fail", "ok"]
    assert out[0].name == "boom" and "kaputt" in out[0].detail and out[0].fix


def test_cli_reference_is_current():
    from pathlib import Path

    from gstalk.clidoc import render_cli_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert doc.read_text() == render_cli_markdown(), \
        "docs/cli.md is stale: run `python -m gstalk.clidoc > docs/cli.md`"


def test_eval_compare_table_and_usage_errors(ws_copy, tmp_path):
    import shutil

    r = runner.invoke(app, ["eval", str(ws_copy), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    single = json.loads(r.stdout)
    other = tmp_path / "other"
    shutil.copytree(ws_copy, other)
    r = runner.invoke(app, ["eval", "--compare", str(ws_copy), str(other), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    # one coarse baseline (both copies share the coarse run) and a row per workspace
    assert [row["model"] for row in rows] == ["coarse (static)", "gstalker", "gstalker"]
    assert rows[1]["psnr"] == pytest.approx(single["psnr"]) == pytest.approx(rows[2]["psnr"])
    assert rows[0]["psnr"] == pytest.approx(single["baselines"]["coarse"]["psnr"])
    r = runner.invoke(app, ["eval", "--compare", str(ws_copy), str(other)])
    assert r.exit_code == 0 and "mouth_psnr" in r.stdout
    r = runner.invoke(app, ["eval", str(ws_copy), str(other)])
    assert r.exit_code == 2 and "--compare" in r.output


@pytest.mark.slow
def test_eval_is_recorded_and_compare_judges_freshness_from_the_manifest(ws_copy):
    """eval runs as a stage: its record names the fine and coarse runs it read, so compare
    knows a stale eval by the manifest, not by file times."""
    import os

    from gstalk.errors import WorkspaceError
    from gstalk.pipeline import evaluate_stale
    from gstalk.stages.compare import compare, needs_eval
    from gstalk.workspace import EVAL_METRICS, FINE_MODEL, Workspace

    assert needs_eval(ws_copy)  # the fixture never evaluated
    with pytest.raises(WorkspaceError, match="no eval of its current model"):
        compare([ws_copy])
    assert evaluate_stale([ws_copy]) == [ws_copy]
    ws = Workspace.open(ws_copy)
    rec = ws.stage("eval")
    assert rec.status == "done" and rec.data["inputs"]["fine"] == ws.stage("fine").run_id
    assert EVAL_METRICS in rec.data["outputs"] and "psnr" in rec.summary and "per_frame" not in rec.summary
    # file times say nothing any more: a model file newer than the metrics is still evaluated
    m = ws_copy / EVAL_METRICS
    os.utime(m, (1_000_000, 1_000_000))
    os.utime(ws_copy / FINE_MODEL, None)
    assert not needs_eval(ws_copy) and evaluate_stale([ws_copy]) == []
    assert compare([ws_copy])["rows"][-1]["model"] == "gstalker"
    # a fine stage re-run since (another run id) makes the eval stale
    ws.manifest["stages"]["fine"]["run_id"] = "rerun"
    ws.save()
    assert needs_eval(ws_copy)
    evaluate_stale([ws_copy])
    assert not needs_eval(ws_copy)
    # so does a metrics.json changed after eval wrote it
    m.write_text(m.read_text().replace('"psnr"', '"psnr_edited"', 1))
    assert needs_eval(ws_copy)


def test_set_changes_fine_settings_and_refuses_unknown_keys():
    from gstalk.config import FineConfig, parse_assignments
    from gstalk.errors import UsageError

    c = parse_assignments(FineConfig(av_offset=3, model="audioplane"),
                          ["dynamic=false", "mask_lambda=0.5", "audio-smooth-window=5", "av_offset=none"])
    assert (c.audioplane.dynamic, c.audioplane.mask_lambda, c.audio_smooth_window, c.av_offset) == (False, 0.5, 5, None)
    c = parse_assignments(FineConfig(), ["model=egstalker", "head=mlp", "egstalker.pe_levels=0"])
    assert (c.model, c.egstalker.head, c.egstalker.pe_levels) == ("egstalker", "mlp", 0)
    audioplane = FineConfig(model="audioplane")
    for bad, msg in (("nope=1", "unknown setting"), ("dynamic=maybe", "not a valid"), ("iterations=1.5", "not a valid"),
                     ("mask_lambda=nan", "not a valid"), ("iterations", "KEY=VALUE"),
                     ("head=mlp", "a setting of --model egstalker"), ("conditioning=lips", "not one of"),
                     ("gstalker.plane_res=3", "unknown setting")):
        with pytest.raises(UsageError, match=msg):
            parse_assignments(audioplane, [bad])
    with pytest.raises(UsageError, match="'banana' is not one of kan, mlp"):
        parse_assignments(FineConfig(model="egstalker"), ["head=banana"])
    r = runner.invoke(app, ["fine", "/nonexistent_ws", "--set", "nope=1"])
    assert r.exit_code == 2 and "unknown setting" in r.output
    # a choice is a one-line usage error at parse time, never a ValueError from inside the model
    r = runner.invoke(app, ["fine", "/nonexistent_ws", "--model", "egstalker", "--set", "head=banana"])
    assert r.exit_code == 2 and "not one of kan, mlp" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["fine", "/nonexistent_ws", "--model", "banana"])
    assert r.exit_code == 2 and "not one of gstalker, audioplane, egstalker" in r.output


def test_serve_refuses_bad_numbers_before_loading_anything(tmp_path):
    """`gstalk serve`'s numeric options are checked first: a usage error (exit 2) naming the
    option, before any avatar path is looked at (this one does not exist)."""
    missing = str(tmp_path / "no_such_avatar")
    for args, message in ((["--threads", "0"], "--threads 0 must be 1 or more"),
                          (["--jpeg-quality", "101"], "--jpeg-quality 101 must be between 1 and 100"),
                          (["--port", "70000"], "--port 70000 must be between 0 and 65535")):
        r = runner.invoke(app, ["serve", missing, *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_plate_statistic_is_checked_before_anything_is_written(tmp_path, mannequin_clip):
    """`--plate` names one of mean/median; another is a usage error (exit 2) naming the flag,
    from `run` before the video is extracted (no workspace folder appears)."""
    ws = tmp_path / "ws"
    r = runner.invoke(app, ["run", str(mannequin_clip.path), "--workspace", str(ws), "--plate", "mode"])
    assert r.exit_code == 2 and "--plate 'mode' is not one of mean, median" in r.output, r.output
    assert not ws.exists()
