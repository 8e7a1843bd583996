"""The bad-input corpus (issue 9): each input gets one clear line, a meaningful exit code, no
traceback, and leaves no broken workspace behind. Inputs are generated here, small."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gstalk.testing.mannequin import head_pose, make_clip, render


def _odd_size_clip(path: Path, width: int = 641, height: int = 479, seconds: float = 3.0) -> None:
    """FFV1 + PCM in Matroska (H.264 4:2:0 cannot hold odd sizes), the mannequin in the middle."""
    import av

    img, _ = render(0.2, head_pose(), 600.0, height)
    pad = (width - height) // 2
    img = np.ascontiguousarray(np.pad(img, ((0, 0), (pad, width - height - pad), (0, 0)), mode="edge"))
    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=25)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv444p"
        aus = c.add_stream("pcm_s16le", rate=16000)
        aus.layout = "mono"
        for _ in range(int(seconds * 25)):
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        t = np.arange(int(seconds * 16000)) / 16000
        tone = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in aus.encode(frame):
            c.mux(p)
        for s in (vs, aus):
            for p in s.encode():
                c.mux(p)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from gstalk.media import VideoWriter

    d = tmp_path_factory.mktemp("bad")
    make_clip(d / "ok.mp4", duration_s=3.0, size=160)
    make_clip(d / "fps60.mp4", duration_s=3.0, size=160, fps=60.0)
    make_clip(d / "short.mp4", duration_s=1.0, size=160)
    with VideoWriter(d / "noaudio.mp4", 160, 160, 25.0) as w:
        img, _ = render(0.2, head_pose(), 320.0, 160)
        for _ in range(75):
            w.write(img)
    import soundfile as sf

    sf.write(d / "speech.wav", 0.3 * np.sin(np.arange(48000) / 5.0), 16000)
    data = (d / "ok.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 100)
    _odd_size_clip(d / "odd.mkv")
    weird = d / "dossier é x"
    weird.mkdir()
    shutil.copy(d / "ok.mp4", weird / "-clip ü 'q'.mp4")
    return d


CASES = [
    # name, file, exit code, message (stderr), extract succeeds
    ("missing file", "nope.mp4", 3, "does not exist", False),
    ("0-byte file", "empty.mp4", 3, "is empty", False),
    ("not a video", "text.mp4", 3, "not a media file", False),
    ("truncated mp4", "truncated.mp4", 3, "truncated or damaged", False),
    ("no audio track", "noaudio.mp4", 3, "has no audio track", False),
    ("audio only", "speech.wav", 3, "has no video stream", False),
    ("too short", "short.mp4", 3, "needs at least 2 s", False),
    ("60 fps", "fps60.mp4", 0, "", True),
    ("odd size 641x479", "odd.mkv", 0, "", True),
    ("spaces, non-ASCII, leading dash, quote", "dossier é x/-clip ü 'q'.mp4", 0, "", True),
]


@pytest.mark.parametrize("name, file, code, message, ok", CASES, ids=[c[0] for c in CASES])
def test_extract_bad_and_odd_inputs(corpus, tmp_path, name, file, code, message, ok):
    ws = tmp_path / "ws"
    r = subprocess.run([sys.executable, "-m", "gstalk", "extract", str(corpus / file), "-w", str(ws),
                        "--preset", "test", "--json"], capture_output=True, text=True)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    if not ok:
        assert message in r.stderr and "Fix:" in r.stderr
        assert r.stdout == ""
        # nothing half-written: no workspace, or one whose extract stage is marked failed with no frames
        if ws.exists():
            manifest = json.loads((ws / "manifest.json").read_text())
            assert manifest["stages"]["extract"]["status"] == "failed"
            assert not any((ws / "extract").glob("frames/*.png"))
        return
    summary = json.loads(r.stdout)
    assert summary["fps"] == 25.0 and summary["n_frames"] == 75  # resampled to 25 fps, 3 s
    assert summary["size"] == 128
    frames = sorted((ws / "extract" / "frames").glob("*.png"))
    assert len(frames) == 75
