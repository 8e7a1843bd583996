"""The full ``track --detector fan`` -> coarse -> fine -> render -> eval path on the synthetic
mannequin clip, with a FAN-shaped TorchScript stand-in (``gstalk.testing.fan``) that the
test scripts and saves; and the CLI's refusals, before anything is written (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gstalk.cli import app

runner = CliRunner()


@pytest.fixture(scope="session")
def fan_weights(tmp_path_factory: pytest.TempPathFactory, mannequin_clip) -> Path:  # type: ignore[no-untyped-def]
    from gstalk.testing.fan import save_mannequin_fan

    d = tmp_path_factory.mktemp("fan")
    return save_mannequin_fan(d / "mannequin-fan.zip", mannequin_clip.poses[0], mannequin_clip.focal,
                              mannequin_clip.size)


@pytest.fixture(scope="session")
def fan_ws(tmp_path_factory: pytest.TempPathFactory, mannequin_clip, fan_weights) -> Path:  # type: ignore[no-untyped-def]
    """A workspace tracked with ``--detector fan`` through the CLI, then coarse and fine (test preset)."""
    from gstalk.config import get_preset
    from gstalk.stages.coarse import run_coarse
    from gstalk.stages.extract import run_extract
    from gstalk.stages.fine import run_fine

    p = get_preset("test")
    root = tmp_path_factory.mktemp("fanws") / "ws"
    run_extract(mannequin_clip.path, root, p.extract, preset="test")
    r = runner.invoke(app, ["track", str(root), "--detector", "fan", "--fan-weights", str(fan_weights), "--quiet",
                            "--json"])
    assert r.exit_code == 0, r.output
    run_coarse(str(root), p.coarse)
    run_fine(str(root), p.fine)
    return root


@pytest.mark.slow
def test_fan_tracks_have_68_points_and_follow_the_known_mouth(fan_ws, mannequin_clip, fan_weights):
    from gstalk.dataset import load_tracks
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import Workspace

    t, meta = load_tensors(fan_ws / "track" / "tracks.safetensors")
    n = len(mannequin_clip.opening)
    assert t["landmarks"].shape == (n, 68, 3) and float(t["landmarks"][..., 2].abs().max()) == 0.0
    assert t["blendshapes"].shape == (n, 0) and t["landmark_scores"].shape == (n, 68)
    assert meta["detector"] == "fan" and meta["landmark_scheme"] == "ibug68" and meta["blendshape_names"] == []
    ws = Workspace.open(fan_ws)
    summary = ws.stage("track").summary
    assert summary["detector"] == "fan" and summary["fan"]["path"] == str(fan_weights.resolve())
    assert summary["fan"]["public_archive"] is False and len(summary["fan"]["sha256"]) == 64
    assert ws.stage("track").data["config"]["detector"] == "fan"  # recorded in the manifest
    # the mouth opening read from FAN's 68 points follows the clip's jaw, and the A/V offset is found
    mouth = t["mouth_open"].numpy()
    assert np.corrcoef(mouth, mannequin_clip.opening)[0, 1] > 0.85
    # the offset comes from the articulation prior, which times mouths as real speakers move
    # them: measured against GRID's in-sync recordings, lips lead the sound by about a frame,
    # while the mannequin's jaw follows its beeps' loudness with none; so the prior reads the
    # mannequin's audio as one frame later than it was shifted (the loudness, in
    # tests/test_tracking.py, finds the shift itself)
    assert summary["av_method"] == "prior" and summary["av_confident"]
    assert summary["av_offset_frames"] == mannequin_clip.offset_frames + 1
    tracks = load_tracks(ws)
    code = tracks.articulation().numpy()
    assert code.shape == (n, 7) and np.corrcoef(code[:, 0], mannequin_clip.opening)[0, 1] > 0.85
    # blink from the eyelids (the mannequin never blinks: the rescaled EAR is noise, but in [0, 1])
    assert 0.0 <= float(tracks.blink.min()) and float(tracks.blink.max()) <= 1.0
    # masks cover the face, the face box is MediaPipe's box FAN was given
    from gstalk.dataset import load_masks

    m = load_masks(ws, [0])[0]
    x0, y0, x1, y1 = tracks.face_box[0].tolist()
    head = m[int(y0):int(y1), int(x0):int(x1), 0]
    assert (head > 0).mean() > 0.5
    lm0 = t["landmarks"][0].numpy()
    assert x0 <= lm0[:, 0].min() + 5 and lm0[:, 0].max() - 5 <= x1


@pytest.mark.slow
def test_fan_workspace_trains_renders_and_evaluates_with_fan_lmd(fan_ws, fan_weights, tmp_path):
    from gstalk.media import probe
    from gstalk.workspace import Workspace

    ws = Workspace.open(fan_ws)
    assert ws.stage("fine").status == "done"
    assert ws.stage("fine").summary["articulation_fit"]["val_r2"] > 0.5  # the code from 68 points is learnable
    out = tmp_path / "say.mp4"
    r = runner.invoke(app, ["render", str(fan_ws), "--audio", str(fan_ws / "extract" / "audio.wav"), "-o", str(out),
                            "--quiet"])
    assert r.exit_code == 0, r.output
    info = probe(out)
    assert info.video is not None and info.video.n_frames == ws.stage("extract").summary["n_frames"]
    r = runner.invoke(app, ["eval", str(fan_ws), "--lmd-landmarks", "fan", "--fan-weights", str(fan_weights),
                            "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    for v in (m, m["baselines"]["coarse"]):
        assert np.isfinite(v["lmd_fan"]) and v["lmd_fan_512"] == pytest.approx(v["lmd_fan"] * 512 / 128)
        assert v["lmd_fan_frames"] == m["n_frames"]
        # MediaPipe's LMD beside it, over the renders MediaPipe finds a face in: the 40-iteration fine
        # model's renders of the mannequin are speckled and may be missed (then NaN over 0 frames);
        # the coarse head's smooth renders are found
        assert 0 <= v["lip_frames"] <= m["n_frames"] and np.isfinite(v["lmd"]) == (v["lip_frames"] > 0)
    assert m["baselines"]["coarse"]["lip_frames"] > 0
    assert set(m["lmd_landmarks"]) == {"lmd", "lmd_fan"} and m["weights"]["fan"]["public_archive"] is False
    report = (fan_ws / "eval" / "report.md").read_text()
    assert "| fine model | FAN 2D-FAN-4, points 48-67 |" in report
    assert "| fine model | MediaPipe, 40 lip points |" in report


def test_fan_without_weights_or_with_a_pickle_is_refused_before_anything_is_written(trained_ws, tmp_path,
                                                                                     monkeypatch):
    import shutil

    from gstalk.workspace import MANIFEST, Workspace

    monkeypatch.delenv("GSTALK_FAN_WEIGHTS", raising=False)
    ws = tmp_path / "ws"
    shutil.copytree(trained_ws / "extract", ws / "extract")
    manifest = json.loads((trained_ws / MANIFEST).read_text())
    manifest["stages"] = {"extract": manifest["stages"]["extract"]}
    (ws / MANIFEST).write_text(json.dumps(manifest))
    before = (ws / MANIFEST).read_bytes()
    r = runner.invoke(app, ["track", str(ws), "--detector", "fan"])
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "--fan-weights" in lines[0] and "2DFAN4-cd938726ad.zip" in lines[0], r.output
    bad = tmp_path / "2DFAN4.pth.tar"
    bad.write_bytes(b"\x80\x02}q\x00.")  # a pickle
    r = runner.invoke(app, ["track", str(ws), "--detector", "fan", "--fan-weights", str(bad)])
    assert r.exit_code == 3 and "is a pickle" in r.output and str(bad) in r.output.replace("\n", "")
    r = runner.invoke(app, ["track", str(ws), "--detector", "dlib"])
    assert r.exit_code == 2 and "mediapipe, fan" in r.output
    assert not (ws / "track").exists() and (ws / MANIFEST).read_bytes() == before
    assert Workspace.open(ws).stage("track").status == "missing"
    # eval: unknown reading, missing weights and a cross-driven eval are refused before any render
    r = runner.invoke(app, ["eval", str(trained_ws), "--lmd-landmarks", "fan"])
    assert r.exit_code == 2 and "--fan-weights" in r.output
    r = runner.invoke(app, ["eval", str(trained_ws), "--lmd-landmarks", "dlib"])
    assert r.exit_code == 2 and "mediapipe, fan" in r.output
    r = runner.invoke(app, ["eval", str(trained_ws), "--lmd-landmarks", "fan", "--audio", str(bad)])
    assert r.exit_code == 2 and "--compare or --audio" in r.output


def test_run_with_fan_refuses_missing_weights_before_extracting(mannequin_clip, tmp_path, monkeypatch):
    monkeypatch.delenv("GSTALK_FAN_WEIGHTS", raising=False)
    ws = tmp_path / "run_ws"
    r = runner.invoke(app, ["run", str(mannequin_clip.path), "-w", str(ws), "--preset", "test", "--detector", "fan"])
    assert r.exit_code == 2 and "--fan-weights" in r.output
    assert not ws.exists()
