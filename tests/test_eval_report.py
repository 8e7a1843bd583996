"""The eval reports: plots (PNG files that parse, at their size), LPIPS and LSE-C/LSE-D in
metrics.json and report.md when weight files are given, the "skipped" note otherwise, and
the CLI's checks of the weight flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gstalk.metrics.plots import HEIGHT, WIDTH, mouth_plot, psnr_plot, zscore_nan


def fill(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random weights of the given shapes (positive where LPIPS requires it, variances > 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) / max(1, int(np.prod(s[1:]))) ** 0.5
        out[k] = t.abs() + 0.5 if k.startswith("lin") or k.endswith("running_var") else t
    return out


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from gstalk.metrics import lpips, syncnet

    d = tmp_path_factory.mktemp("weights")
    save_file(fill(lpips.expected_shapes("alex"), 0), str(d / "lpips alex.safetensors"))
    save_file(fill(syncnet.expected_shapes(), 1), str(d / "syncnet.safetensors"))
    return d / "lpips alex.safetensors", d / "syncnet.safetensors"


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def test_plots_are_pngs_of_the_documented_size(tmp_path):
    frames = list(range(10, 20))
    psnr_plot(tmp_path / "psnr.png", frames, {"fine": np.linspace(20, 30, 10), "coarse": [np.inf] + [25.0] * 9})
    opening = np.sin(np.arange(10.0))
    opening[3] = np.nan
    mouth_plot(tmp_path / "mouth.png", frames, {"render": opening, "predicted from the audio": np.cos(np.arange(10.0))},
               title="t")
    for name in ("psnr.png", "mouth.png"):
        assert png_size(tmp_path / name) == (WIDTH, HEIGHT)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary files left
    with pytest.raises(ValueError, match="'fine' has"):
        psnr_plot(tmp_path / "x.png", frames, {"fine": [1.0, 2.0]})
    z = zscore_nan(np.array([1.0, np.nan, 3.0]))
    assert z[0] == pytest.approx(-1.0) and np.isnan(z[1]) and z[2] == pytest.approx(1.0)
    assert (zscore_nan(np.ones(3)) == 0).all()


def test_eval_with_weights_reports_lpips_lse_and_plots(ws_copy, weight_files):
    from gstalk.stages.evaluate import report_markdown, run_eval

    lp, sn = weight_files
    m = run_eval(str(ws_copy), lpips=lp, syncnet=sn)
    saved = json.loads((ws_copy / "eval" / "metrics.json").read_text())
    for v in (saved, saved["baselines"]["mean_frame"], saved["baselines"]["coarse"]):
        assert 0 < v["lpips"] < 10 and 0 < v["face_lpips"] < 10
    for v in (saved, saved["baselines"]["coarse"], saved["real_video"]):
        assert np.isfinite(v["lse_d"]) and v["lse_c"] >= 0 and v["syncnet_windows"] == 2  # 7 test frames
    assert saved["skipped"] == [] and saved["weights"]["lpips"]["net"] == "alex"
    assert Path(saved["weights"]["syncnet"]["path"]) == sn.resolve()
    pf = saved["per_frame"]
    assert pf["frame"] == list(range(*saved["split"]["test"]))
    assert all(len(pf[k]) == 7 for k in pf)
    assert pf["psnr"][0] == pytest.approx(float(np.asarray(pf["psnr"]).mean()), abs=5)
    report = (ws_copy / "eval" / "report.md").read_text()
    assert "| LPIPS (alex; lower is better) |" in report and "| SyncNet | LSE-C" in report
    assert "skipped" not in report
    d = ws_copy / "eval"
    for name in ("psnr.png", "mouth.png"):
        assert f"]({name})" in report and png_size(d / name) == (WIDTH, HEIGHT)
    from gstalk.dataset import load_frame
    from gstalk.workspace import Workspace

    fh, fw, _ = load_frame(Workspace.open(ws_copy), 0).shape
    assert png_size(d / "samples.png") == (4 * fw, 4 * fh)  # ground truth | coarse | fine | error, 4 test frames
    none = report_markdown({**m, "skipped": ["lpips", "syncnet"]})
    assert "LPIPS/LSE-C/LSE-D: skipped (pass --lpips PATH / --syncnet PATH" in none
    assert "LSE-C/LSE-D: skipped (pass --syncnet PATH" in report_markdown({**m, "skipped": ["syncnet"]})


def test_cross_eval_with_syncnet_and_mouth_plot(ws_copy, weight_files, tmp_path, monkeypatch):
    """Cross-driven with --syncnet (the video net replaced by a cheap stand-in: the network
    itself is checked in test_metrics_syncnet.py; here the plumbing, JSON and report)."""
    import soundfile as sf
    from typer.testing import CliRunner

    from gstalk.cli import app
    from gstalk.metrics.syncnet import SyncNet

    calls = []

    def cheap_video(self, crops, batch=16):  # [F, 224, 224, 3] -> [F - 4, 1024]
        calls.append(len(crops))
        small = torch.from_numpy(crops[:, ::7, ::7, 0].astype(np.float32)).flatten(1)[:, :1024]
        return torch.stack([small[i:i + 5].mean(0) for i in range(len(crops) - 4)])

    monkeypatch.setattr(SyncNet, "embed_video", cheap_video)
    sr = 16000
    t = np.arange(2 * sr) / sr
    wav = tmp_path / "speech.wav"
    sf.write(wav, 0.3 * np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 2 * t) > 0), sr)
    r = CliRunner().invoke(app, ["eval", str(ws_copy), "--audio", str(wav), "--syncnet", str(weight_files[1]),
                                 "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert calls == [50, 74]  # the renders (reused for the reversed speech), then the real video (70 windows)
    for v in (m, m["mismatched"], m["real_video"]):
        assert np.isfinite(v["lse_d"]) and np.isfinite(v["lse_c"]) and v["syncnet_windows"] > 0
    assert m["syncnet_windows"] == 45 and m["real_video"]["syncnet_windows"] == 70
    assert m["skipped"] == [] and len(m["per_frame"]["mouth_opening"]) == 50
    d = ws_copy / "eval" / "cross_speech"
    report = (d / "report.md").read_text()
    assert "| SyncNet | LSE-C" in report and "](mouth.png)" in report and "skipped" not in report
    assert png_size(d / "mouth.png") == (WIDTH, HEIGHT)


def test_cli_checks_weight_flags_before_rendering(ws_copy, tmp_path):
    from typer.testing import CliRunner

    from gstalk.cli import app

    runner = CliRunner()
    (ws_copy / "eval" / "metrics.json").unlink(missing_ok=True)  # another test may have evaluated trained_ws
    bad = tmp_path / "lpips.pth"
    bad.write_bytes(b"\x80\x04not safetensors")
    r = runner.invoke(app, ["eval", str(ws_copy), "--lpips", str(bad)])
    assert r.exit_code == 3 and "lpips.pth" in r.output and "not a safetensors file" in r.output
    assert not (ws_copy / "eval" / "metrics.json").exists()
    r = runner.invoke(app, ["eval", str(ws_copy), "--syncnet", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 3 and "missing.safetensors" in r.output
    r = runner.invoke(app, ["eval", str(ws_copy), "--audio", str(tmp_path / "a.wav"), "--lpips", str(bad)])
    assert r.exit_code == 2 and "ground truth" in r.output
    r = runner.invoke(app, ["eval", "--compare", str(ws_copy), str(ws_copy), "--syncnet", str(bad)])
    assert r.exit_code == 2 and "--compare" in r.output


def test_report_rows_name_the_model_its_code_rows_and_the_baselines_in_order():
    from gstalk.stages.evaluate import report_rows

    m = {"lmd": 1.0, "codes": {"oracle": {"lmd": 0.5}, "neutral": {}},
         "baselines": {"mean_frame": {}, "coarse": {"lmd": 2.0}}}
    assert [n for n, _ in report_rows(m)] == ["fine model", "fine model, tracked code (oracle)",
                                              "fine model, neutral code", "baseline: mean_frame", "baseline: coarse"]
    got = report_rows(m, "lmd")
    assert [(n, v["lmd"]) for n, v in got] == [("fine model", 1.0), ("fine model, tracked code (oracle)", 0.5),
                                               ("baseline: coarse", 2.0)]
    assert got[0][1] is m  # the model's row is the metrics themselves


def test_markdown_table_and_the_report_tables_built_with_it():
    """The helper writes the header, the separator and the rows as given, and refuses a row
    of the wrong width; the stability and LMD tables are built with it, one row per named row
    (a FAN row beside the MediaPipe row when FAN was measured)."""
    from gstalk.metrics.report import markdown_table
    from gstalk.stages.evaluate import lmd_lines, stability_lines

    assert markdown_table(["", "a", "b"], [["x", "1", "2"]]) == ["|  | a | b |", "|---|---|---|", "| x | 1 | 2 |"]
    assert markdown_table(["a"], []) == ["| a |", "|---|"]
    with pytest.raises(ValueError, match="needs 2 cells, got 1"):
        markdown_table(["a", "b"], [["only"]])
    row = {"sharpness_ratio": 0.5, "psnr_trend_db": -1.25, "psnr_slope_db_per_s": -0.5}
    m = {**row, "codes": {"oracle": dict(row, sharpness_ratio=0.6)}, "baselines": {"coarse": {}}}
    lines = stability_lines(m)
    assert lines[3:5] == ["| fine model | 0.50 | -1.25 | -0.50 |",
                          "| fine model, tracked code (oracle) | 0.60 | -1.25 | -0.50 |"]
    assert stability_lines({"baselines": {}}) == []
    lip = {"lmd": 1.0, "lmd_512": 2.0, "aue": 0.01, "lip_frames": 7}
    m = {**lip, "lmd_fan": 1.5, "lmd_fan_512": 3.0, "lmd_fan_frames": 6, "baselines": {"coarse": dict(lip)}}
    rows = [line for line in lmd_lines(m) if line.startswith("| fine model") or line.startswith("| baseline")]
    assert rows == ["| fine model | MediaPipe, 40 lip points | 1.00 | 2.00 | 0.0100 | 7 |",
                    "| fine model | FAN 2D-FAN-4, points 48-67 | 1.50 | 3.00 | – | 6 |",
                    "| baseline: coarse | MediaPipe, 40 lip points | 1.00 | 2.00 | 0.0100 | 7 |"]


def test_sync_lse_and_summary_tables_share_the_helper():
    """The lip-sync proxy table (eval's and the cross-driven report's) keeps only the rows
    that were scored and formats each; the SyncNet table writes a dash row for a note; the
    several-voice table ends with its mean row."""
    from gstalk.metrics.report import lse_lines, sync_lines
    from gstalk.stages.crosseval import cross_summary_report

    scored = {"sync_corr": 0.4567, "sync_lag": -2, "sync_corr_best": 0.61}
    assert sync_lines([("fine model", scored), ("baseline: coarse", {})]) == [
        "| lip-sync proxy | corr at lag 0 | best lag (frames) | corr at best lag |", "|---|---|---|---|",
        "| fine model | 0.46 | -2 | 0.61 |"]
    lse = lse_lines([("a", {"lse_c": 7.1234, "lse_d": 6.5, "syncnet_offset": 1, "syncnet_windows": 40}),
                     ("b", {"syncnet_note": "no face"}), ("c", {})])
    assert lse[3:5] == ["| a | 7.123 | 6.500 | +1 | 40 |", "| b | – | – | – | no face |"]
    voice = {"voice": "de", "sync_corr": 0.3, "sync_lag": 1, "sync_corr_best": 0.5, "sync_fraction": 0.6,
             "mouth_motion": 0.9}
    s = {"voices": [voice], "summary": voice, "workspace": "ws", "gstalk_version": "x", "created": "now",
         "articulation_gain": 1.0, "real_video": {"sync_corr_best": 0.8, "sync_lag": 0},
         "targets": {"met": {"lag": True}}}
    lines = cross_summary_report(s).splitlines()
    i = lines.index("| voice | corr at lag 0 | best lag | corr at best lag | lag-0 corr / real | mouth motion |")
    assert lines[i + 2:i + 4] == ["| de | 0.30 | +1 | 0.50 | 0.60 | 0.90 |",
                                  "| **mean** | 0.30 | – | 0.50 | 0.60 | 0.90 |"]
