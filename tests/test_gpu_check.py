"""``benchmarks/gpu_check.sh``: its dry run (what CI runs) lists every step with the command it
would run, and its summary line is built from real ``gstalk run`` / ``bench render`` outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_step_with_its_command():
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # stdout is for the one JSON line of a real run
    err = r.stderr
    steps = [line for line in err.splitlines() if line.startswith("[")]
    commands = [line.strip()[2:] for line in err.splitlines() if line.strip().startswith("$ ")]
    assert len(steps) == len(commands) == 8
    assert "nvidia-smi" in commands[0]
    assert "pip install -q -e '.[dev,cuda]'" in commands[1]
    assert "-m pytest -q -m cuda tests" in commands[4]
    run = commands[5]
    for part in ("-m gstalk run examples/obama.mp4", "--preset paper", "--device cuda", "--raster gsplat", "--json"):
        assert part in run
    assert "bench render" in commands[6] and "--size 512" in commands[6] and "--device cuda" in commands[6]
    assert "gpu_summary.py" in commands[7]
    assert (REPO / "examples" / "obama.mp4").is_file()  # the clip it trains on ships with the repository
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--no-install"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "pip install" not in r.stderr
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--frobnicate"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown option --frobnicate" in r.stderr


def test_summary_is_one_json_line_of_times_speed_and_metrics(tmp_path):
    metrics = {"psnr": 31.2, "ssim": 0.93, "face_psnr": 30.1, "mouth_psnr": 29.9, "mouth_ssim": 0.86, "lmd": 0.8,
               "lmd_512": 1.6, "aue": 0.02, "mouth_motion": 0.9, "render_fps": 140.0, "per_frame": {"psnr": [1]},
               "baselines": {"coarse": {"psnr": 30.0, "mouth_psnr": 29.5, "ssim": 0.9}}}
    run = {"workspace": "ws", "video": "ws/renders/test.mp4", "device": "cuda:0", "preset": "paper",
           "seconds": {"extract": 10, "track": 60, "coarse": 600, "fine": 1800, "render": 5, "eval": 30},
           "metrics": metrics}
    bench = {"render_fps_median": 150.25, "render_fps_p10": 120.0, "end_to_end_fps": 90.0, "size": [512, 512]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_summary.py"), str(tmp_path / "run.json"),
                        str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    s = json.loads(r.stdout)
    assert s["seconds"]["total"] == 2505 and s["train_minutes"] == 40.0
    assert s["render_fps_512"] == 150.2 and s["end_to_end_fps_512"] == 90.0
    assert s["metrics"]["psnr"] == 31.2 and "per_frame" not in s["metrics"]
    assert s["baselines"]["coarse"] == {"psnr": 30.0, "mouth_psnr": 29.5}
    assert s["device"] == "cuda:0" and s["preset"] == "paper" and "torch" in s
