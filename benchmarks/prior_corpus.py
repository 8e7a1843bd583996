"""Extract and track every real clip with speech in ``../shared/data`` into workspaces.

The articulation prior (``python -m gstalk.prior fit``) and the front-end comparison
(``benchmarks/frontends.py``) read these workspaces. Clips whose speech ships as a separate
``.wav`` (the StyleTalk face crops) are muxed with it into a temporary mp4 first (stream
copy for the video, the audio as AAC), since ``gstalk extract`` needs one file.

Usage::

    python benchmarks/prior_corpus.py --data ../shared/data --out corpus_ws [--only NAME ...]

Re-running skips the clips whose track stage is done. Prints one JSON line per clip.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def clips(data: Path) -> list[tuple[str, Path, Path | None]]:
    """(name, video, separate wav or None) for every talking-head clip with speech."""
    out: list[tuple[str, Path, Path | None]] = []
    for v in sorted((data / "speakers").glob("*.mp4")):
        wav = v.with_suffix(".wav")
        out.append((v.stem, v, wav if wav.exists() else None))
    for name in ("obama", "aoc_hdtf"):
        out.append((name, data / "video" / f"{name}.mp4", None))
    for v in sorted((data / "grid").glob("*.mpg")):
        out.append((f"grid_{v.stem}", v, None))
    return out


def mux(video: Path, wav: Path, dst: Path) -> None:
    from imageio_ffmpeg import get_ffmpeg_exe

    subprocess.run([get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(video), "-i", str(wav), "-map", "0:v:0",
                    "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "192k", str(dst)], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data", type=Path)
    ap.add_argument("--out", default="corpus_ws", type=Path)
    ap.add_argument("--preset", default="cpu-quick")
    ap.add_argument("--only", nargs="*", default=None, help="clip names to (re)do")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, video, wav in clips(args.data):
        if args.only and name not in args.only:
            continue
        ws = args.out / name
        manifest = ws / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["stages"].get("track", {}).get("status") == "done":
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            src = video
            if wav is not None:
                src = Path(tmp) / f"{name}.mp4"
                mux(video, wav, src)
            r = subprocess.run([sys.executable, "-m", "gstalk", "extract", str(src), "-w", str(ws), "--preset",
                                args.preset, "-q"], capture_output=True, text=True)
            if r.returncode == 0:
                r = subprocess.run([sys.executable, "-m", "gstalk", "track", str(ws), "-q"], capture_output=True,
                                   text=True)
        print(json.dumps({"clip": name, "ok": r.returncode == 0, "seconds": round(time.perf_counter() - t0, 1),
                          "error": r.stderr.strip()[-300:] if r.returncode else None}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
