"""Bad and awkward inputs for the reliability corpus (issue 9), made on the spot and small.

Each builder writes one file and returns its path. They share the talking mannequin of
:mod:`gstalk.testing.mannequin` (MediaPipe sees it as a face), so a case differs from a
good clip only in the one property it tests: rotation metadata, variable frame rate, two
faces, a small face, 4K, an odd size, or, for audio, an empty / 8 kHz / stereo / mp3 / long
file. Used by ``tests/test_bad_inputs.py`` and ``benchmarks/reliability_table.py``.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

from gstalk.testing.mannequin import beep_track, head_pose, render

FPS = 25.0
SAMPLE_RATE = 16000


def talking_frames(seconds: float, size: int, fps: float = FPS, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """The mannequin talking to a beeping tone: ([F] [size, size, 3] uint8 RGB frames at
    ``fps``, [S] float32 audio at 16 kHz), the head swaying slightly."""
    audio, env = beep_track(seconds, SAMPLE_RATE, fps, seed=seed)
    frames = [render(float(env[i]), head_pose(yaw=0.1 * np.sin(i / 10.0)), 2.0 * size, size)[0]
              for i in range(len(env))]
    return frames, audio


def write_clip(path: str | Path, frames: list[np.ndarray], audio: np.ndarray | None, fps: float = FPS,
               crf: int = 18, preset: str = "veryfast") -> Path:
    """H.264 + AAC mp4 of RGB ``frames`` (even sizes) and mono 16 kHz ``audio`` (None: silent)."""
    from gstalk.media import VideoWriter, write_wav

    path = Path(path)
    h, w = frames[0].shape[:2]
    with tempfile.TemporaryDirectory() as tmp:
        wav = None
        if audio is not None:
            wav = Path(tmp) / "audio.wav"
            write_wav(wav, audio, SAMPLE_RATE)
        with VideoWriter(path, w, h, fps, audio_path=wav, crf=crf, preset=preset) as vw:
            for f in frames:
                vw.write(np.ascontiguousarray(f))
    return path


def _ffmpeg(*args: str) -> None:
    from gstalk.media import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def portrait_frames(frames: list[np.ndarray], pad: int = 32) -> list[np.ndarray]:
    """Frames padded top and bottom (edge colour) into a portrait picture, like a phone's."""
    return [np.ascontiguousarray(np.pad(f, ((pad, pad), (0, 0), (0, 0)), mode="edge")) for f in frames]


def rotated_clip(path: str | Path, seconds: float = 3.0, size: int = 160) -> tuple[Path, Path]:
    """A phone video: the portrait picture stored turned 90° clockwise (landscape pixels) with
    display-matrix metadata saying "turn it back 90° counter-clockwise", as phones write it.

    Returns:
        (the rotated clip, the same picture stored upright, for comparison).
    """
    path = Path(path)
    frames, audio = talking_frames(seconds, size)
    upright = portrait_frames(frames)
    ref = write_clip(path.with_name(path.stem + "_upright.mp4"), upright, audio)
    stored = path.with_name(path.stem + "_stored.mp4")
    write_clip(stored, [np.ascontiguousarray(np.rot90(f, -1)) for f in upright], audio)
    _ffmpeg("-display_rotation", "90", "-i", str(stored), "-c", "copy", str(path))
    stored.unlink()
    return path, ref


def vfr_clip(path: str | Path, seconds: float = 3.0, size: int = 160, gaps_ms: tuple[int, ...] = (20, 40, 80),
             seed: int = 0) -> Path:
    """A variable-frame-rate video (screen recorders, phones): frame time stamps drawn from
    ``gaps_ms`` apart at random, H.264 with a 1 ms time base, and AAC audio of ``seconds``."""
    import av

    path = Path(path)
    rng = np.random.default_rng(seed)
    audio, env = beep_track(seconds, SAMPLE_RATE, FPS, seed=seed)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        aus = c.add_stream("aac", rate=SAMPLE_RATE)
        aus.layout = "mono"
        t = 0
        while t < seconds * 1000 - 1:
            k = min(int(t / 1000 * FPS), len(env) - 1)
            img = render(float(env[k]), head_pose(yaw=0.1 * np.sin(k / 10.0)), 2.0 * size, size)[0]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = int(t), Fraction(1, 1000)
            for p in vs.encode(frame):
                c.mux(p)
            t += int(rng.choice(gaps_ms))
        for p in vs.encode():
            c.mux(p)
        a = av.AudioFrame.from_ndarray((audio[None] * 32767).astype(np.int16), format="s16", layout="mono")
        a.sample_rate = SAMPLE_RATE
        for p in [*aus.encode(a), *aus.encode()]:
            c.mux(p)
    return path


def two_faces_clip(path: str | Path, seconds: float = 3.0, size: int = 160) -> Path:
    """The mannequin twice, side by side (``2·size`` x ``size``), one soundtrack."""
    frames, audio = talking_frames(seconds, size)
    return write_clip(path, [np.concatenate([f, f], 1) for f in frames], audio)


def small_face_clip(path: str | Path, seconds: float = 3.0, face: int = 72, width: int = 640,
                    height: int = 480) -> Path:
    """A ``width`` x ``height`` video with the mannequin ``face`` px (render size; its
    landmark box is ~0.73 of that) near the middle: too small for a large ``--size``."""
    import cv2

    small, audio = talking_frames(seconds, 160)
    out = []
    y, x = height // 2 - face // 2, width // 2 - face // 2
    for f in small:
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = f[0, 0]
        canvas[y:y + face, x:x + face] = cv2.resize(f, (face, face), interpolation=cv2.INTER_AREA)
        out.append(canvas)
    return write_clip(path, out, audio)


def uhd_clip(path: str | Path, seconds: float = 2.0, width: int = 3840, height: int = 2160) -> Path:
    """A 4K (3840x2160) clip: the mannequin, mouth opening and closing, x264 ultrafast (two
    distinct pictures, so encoding takes seconds, not minutes)."""
    audio, _ = beep_track(seconds, SAMPLE_RATE, FPS)
    pad = (width - height) // 2
    pics = [np.ascontiguousarray(np.pad(render(o, head_pose(), 2.0 * height, height)[0],
                                        ((0, 0), (pad, width - height - pad), (0, 0)), mode="edge"))
            for o in (0.0, 0.8)]
    n = int(round(seconds * FPS))
    return write_clip(path, [pics[(i // 5) % 2] for i in range(n)], audio, crf=28, preset="ultrafast")


# ------------------------------------------------------------------------------ audio
def wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM wav of float samples in [-1, 1]: [S] mono or [S, C] channels."""
    import soundfile as sf

    sf.write(str(path), np.asarray(samples, np.float32), sample_rate, subtype="PCM_16")
    return Path(path)


def tone(seconds: float, sample_rate: int, hz: float = 220.0) -> np.ndarray:
    """[S] float32 sine at 0.3 amplitude."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def mp3(path: str | Path, source: str | Path) -> Path:
    """``source`` encoded as 64 kb/s mp3 with the ffmpeg binary (arguments as a list)."""
    _ffmpeg("-i", str(source), "-c:a", "libmp3lame", "-b:a", "64k", str(path))
    return Path(path)


def silent_wav(path: str | Path, seconds: float, sample_rate: int = 16000, block_s: float = 60.0) -> Path:
    """A long silent 16-bit wav written block by block (an hour at 16 kHz: 115 MB on disk)."""
    import soundfile as sf

    with sf.SoundFile(str(path), "w", sample_rate, 1, "PCM_16") as f:
        left = int(round(seconds * sample_rate))
        block = np.zeros(int(block_s * sample_rate), np.int16)
        while left > 0:
            f.write(block[:min(left, block.size)])
            left -= block.size
    return Path(path)


AUDIO_CASES: dict[str, Callable[[Path], Path]] = {
    "empty (0 s)": lambda d: wav(d / "empty.wav", np.zeros(0, np.float32), 16000),
    "8 kHz": lambda d: wav(d / "tone8k.wav", tone(0.4, 8000), 8000),
    "stereo": lambda d: wav(d / "stereo.wav", np.stack([tone(0.4, 16000), tone(0.4, 16000, 330.0)], 1), 16000),
    "mp3": lambda d: mp3(d / "speech.mp3", wav(d / "for_mp3.wav", tone(0.4, 16000), 16000)),
    "shorter than a frame (10 ms)": lambda d: wav(d / "blip.wav", tone(0.01, 16000), 16000),
}
"""Render-audio corpus: name -> builder(folder) -> file."""


# ------------------------------------------------------------------------------ the table
LOG_ENV = "GSTALK_RELIABILITY_LOG"


def record(group: str, case: str, command: str, code: int, message: str, intact: str) -> None:
    """Append one row of the reliability table (``docs/reliability.md``) to the JSON-lines
    file named by ``$GSTALK_RELIABILITY_LOG``; nothing when it is unset. The corpus tests
    call it with what they asserted, and ``benchmarks/reliability_table.py`` renders it.

    Args:
        group: table section ("extract", "render --audio", "workspace", "training", "kill -9").
        case: the bad input, e.g. "0-byte file".
        command: the command line, shortened (``gstalk extract empty.mp4``).
        code: exit code.
        message: the line gstalk printed (rich's wrapping undone), or what happened.
        intact: "yes" / "no", with a few words.
    """
    import json
    import os

    log = os.environ.get(LOG_ENV)
    if not log:
        return
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"group": group, "case": case, "command": command, "code": code,
                            "message": " ".join(message.split()), "intact": intact}) + "\n")


def first_line(stderr: str, prefixes: tuple[str, ...] = ("error:", "warning:")) -> str:
    """The first line of ``stderr`` starting with one of ``prefixes``, or ''. (Set
    ``COLUMNS`` wide, e.g. 1000, so that rich does not wrap it.)"""
    for line in stderr.splitlines():
        if line.strip().startswith(prefixes):
            return line.strip()
    return ""
