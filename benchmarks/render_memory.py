"""Peak memory of ``gstalk render`` against the length of the audio (issue 7: flat within 10%).

Usage::

    python benchmarks/render_memory.py WS SPEECH.wav [--seconds 10 60 300] [--json]

For each length, SPEECH is tiled (or cut) to that many seconds, written as a 16-bit wav in a
temporary folder, and rendered with ``python -m gstalk render WS --audio X -o OUT --json``
in a subprocess. While it runs, the resident memory (VmRSS from /proc) of the gstalk
process and of all its children (the ffmpeg encoder) is sampled every 50 ms; the table
gives the peak of gstalk alone, the peak of the whole process tree, the render speed and
the real-time factor that gstalk reports. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (tid / "children").read_text().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def measure(ws: str, audio: Path, out: Path) -> dict:
    """Run one render; its JSON summary plus ``peak_self_mb`` and ``peak_tree_mb`` (MiB)."""
    cmd = [sys.executable, "-m", "gstalk", "render", ws, "--audio", str(audio), "-o", str(out), "--json", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"self": 0, "tree": 0}

    def sample() -> None:
        while proc.poll() is None:
            peak["self"] = max(peak["self"], _rss_kib(proc.pid))
            peak["tree"] = max(peak["tree"], sum(_rss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"render failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    summary = json.loads(stdout)
    summary.update(peak_self_mb=peak["self"] / 1024.0, peak_tree_mb=peak["tree"] / 1024.0)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("speech")
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0, 300.0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    x, sr = sf.read(args.speech, dtype="float32", always_2d=True)
    x = x.mean(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seconds:
            n = int(round(s * sr))
            y = np.tile(x, n // x.size + 1)[:n]
            wav = Path(tmp) / f"speech_{s:g}s.wav"
            sf.write(wav, y, sr, subtype="PCM_16")
            r = measure(args.workspace, wav, Path(tmp) / f"out_{s:g}s.mp4")
            rows.append({"audio_s": s, "frames": r["frames"], "peak_self_mb": r["peak_self_mb"],
                         "peak_tree_mb": r["peak_tree_mb"], "fps": r["fps"], "realtime_factor": r["realtime_factor"]})
            print(f"{s:7.0f} s audio: {r['frames']:6d} frames, gstalk peak {r['peak_self_mb']:7.1f} MiB, "
                  f"with ffmpeg {r['peak_tree_mb']:7.1f} MiB, {r['fps']:5.1f} frames/s, "
                  f"real-time factor {r['realtime_factor']:.2f}", file=sys.stderr, flush=True)
    base = rows[0]["peak_tree_mb"]
    for r in rows:
        r["growth_vs_first"] = r["peak_tree_mb"] / base - 1.0
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
