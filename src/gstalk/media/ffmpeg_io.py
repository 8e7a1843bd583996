"""Decode, resample, encode and mux through ffmpeg-python and imageio-ffmpeg's binary.

One media path, pip-only: ``ffmpeg-python`` builds the command lines and the ``ffmpeg``
executable comes from the ``imageio-ffmpeg`` wheel (or ``$GSTALK_FFMPEG`` if set). Arguments
are always passed as lists (never through a shell) and input files are given as
``file:<absolute path>``, so names with spaces, quotes or leading dashes are safe.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gstalk.errors import DependencyError, InputError, ResourceError


def ffmpeg_exe() -> str:
    """Path of the ffmpeg executable (``$GSTALK_FFMPEG`` or imageio-ffmpeg's bundled one).

    Raises:
        DependencyError: no ffmpeg found.
    """
    env = os.environ.get("GSTALK_FFMPEG")
    if env:
        return env
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # noqa: BLE001 - any failure means "no ffmpeg"
        raise DependencyError(f"No ffmpeg executable found ({exc}).",
                              hint="pip install imageio-ffmpeg, or set GSTALK_FFMPEG to an ffmpeg binary") from None


def _file_url(path: str | Path) -> str:
    return "file:" + str(Path(path).resolve())


def _global(stream):  # type: ignore[no-untyped-def]
    return stream.global_args("-hide_banner", "-loglevel", "error", "-nostdin")


def _stderr_line(err: bytes) -> str:
    lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def read_video_frames(
    path: str | Path,
    *,
    fps: float,
    crop: tuple[int, int, int, int] | None = None,
    size: int | tuple[int, int] | None = None,
    src_size: tuple[int, int],
) -> Iterator[np.ndarray]:
    """Decode a video as RGB frames, resampled to a constant ``fps``.

    Args:
        path: video file.
        fps: output frame rate (frames are dropped/duplicated by ffmpeg's ``fps`` filter).
        crop: (x, y, w, h) in source pixels (after rotation), inside the frame, applied
            before scaling.
        size: output side (square) or (width, height); None keeps the cropped size.
        src_size: (width, height) of the displayed source (from :func:`~gstalk.media.probe`).

    Yields:
        [H, W, 3] uint8 C-contiguous arrays, RGB.

    Raises:
        InputError: ffmpeg could not decode the file (its last error line is included).
    """
    import ffmpeg

    w, h = src_size
    stream = ffmpeg.input(_file_url(path)).video.filter("fps", fps=fps)
    if crop is not None:
        cx, cy, cw, ch = crop
        stream = stream.crop(cx, cy, cw, ch)
        w, h = cw, ch
    if size is not None:
        ow, oh = (size, size) if isinstance(size, int) else size
        stream = stream.filter("scale", ow, oh, flags="area")
        w, h = ow, oh
    out = _global(stream.output("pipe:", format="rawvideo", pix_fmt="rgb24"))
    errf = tempfile.TemporaryFile()  # a file, not a pipe: many decode errors cannot block ffmpeg
    proc = subprocess.Popen(out.compile(cmd=ffmpeg_exe()), stdout=subprocess.PIPE, stderr=errf)
    nbytes = w * h * 3
    killed = False
    try:
        assert proc.stdout is not None
        while True:
            buf = proc.stdout.read(nbytes)
            if len(buf) < nbytes:
                break
            yield np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy()
    finally:
        if proc.poll() is None:  # the consumer stopped early
            killed = True
            proc.kill()
        proc.communicate()
        errf.seek(0)
        err = errf.read()
        errf.close()
    if proc.returncode != 0 and not killed:
        raise InputError(f"ffmpeg could not decode {path}: {_stderr_line(err)}.",
                         hint="check that the file plays; re-encode it with ffmpeg if it is damaged", path=path)


def read_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream as mono float32 at ``sample_rate`` Hz.

    Channels are mixed by averaging (ffmpeg first folds anything beyond stereo into two
    channels with its standard downmix), so a mono file and the same sound on both
    channels of a stereo file give the same samples.

    Args:
        path: any audio or video file ffmpeg reads (wav, mp3, m4a, flac, mp4, ...).
        sample_rate: output rate in Hz.

    Returns:
        [S] float32 samples in [-1, 1].

    Raises:
        InputError: missing/unreadable file, no audio stream, or ffmpeg failed.
    """
    import ffmpeg

    from gstalk.media.probe import probe

    info = probe(path)
    if info.audio is None:
        raise InputError(f"{path} has no audio track.", hint="give a file with speech audio", path=path)
    out = _global(ffmpeg.input(_file_url(path)).audio.output("pipe:", format="f32le", ac=2, ar=sample_rate))
    # Stream the stereo pairs and mix each block to mono at once: memory stays at the mono
    # result (4 bytes per sample) whatever the length; an hour at 16 kHz is 230 MB.
    buf = MonoBuffer(int((info.audio.duration_s or info.duration_s) * sample_rate) + sample_rate)
    with tempfile.TemporaryFile() as errf:  # a file, not a pipe: many decode errors cannot block ffmpeg
        proc = subprocess.Popen(out.compile(cmd=ffmpeg_exe()), stdout=subprocess.PIPE, stderr=errf)
        assert proc.stdout is not None
        try:
            rest = b""
            while block := proc.stdout.read(1 << 20):
                block = rest + block
                cut = len(block) // 8 * 8
                buf.append(np.frombuffer(block[:cut], np.float32).reshape(-1, 2).mean(1, dtype=np.float32))
                rest = block[cut:]
        finally:
            if proc.poll() is None and sys.exc_info()[0] is not None:
                proc.kill()
            proc.stdout.close()
            proc.wait()
        errf.seek(0)
        err = errf.read()
    if proc.returncode != 0:
        raise InputError(f"ffmpeg could not decode the audio of {path}: {_stderr_line(err)}.", path=path)
    return buf.array()


class MonoBuffer:
    """A growing float32 array: ``append`` blocks, ``array()`` returns the filled part.

    Args:
        capacity: samples to reserve (e.g. from the probed duration); doubled when exceeded.
    """

    def __init__(self, capacity: int):
        self._data = np.empty(max(1, capacity), np.float32)
        self._n = 0

    def append(self, block: np.ndarray) -> None:
        """Append a [k] float32 block."""
        need = self._n + block.size
        if need > self._data.size:
            grown = np.empty(max(need, 2 * self._data.size), np.float32)
            grown[:self._n] = self._data[:self._n]
            self._data = grown
        self._data[self._n:need] = block
        self._n = need

    def array(self) -> np.ndarray:
        """[n] float32: the samples appended so far (a view when the reserve was right-sized)."""
        if self._n < 0.9 * self._data.size:  # do not keep a large unused reserve alive
            return self._data[:self._n].copy()
        return self._data[:self._n]


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write mono float samples as 16-bit PCM WAV (soundfile), atomically.

    Args:
        samples: [S] float32 in [-1, 1].
        sample_rate: Hz.
    """
    import soundfile as sf

    from gstalk.workspace import atomic_write

    with atomic_write(path) as f:
        sf.write(f, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


class VideoWriter:
    """Encode RGB frames to H.264 (yuv420p) through an ffmpeg pipe, muxing an audio file.

    Frames are written one at a time, so memory does not grow with the video's length.
    The audio (if given) is copied from the start of ``audio_path`` and encoded to AAC;
    both streams start at t = 0 (no offset).

    Args:
        path: output file (``.mp4``), or ``"-"`` for standard output (fragmented MP4).
        width, height: frame size in pixels (even numbers for yuv420p).
        fps: frames per second.
        audio_path: audio file to mux, or None for a silent video.
        crf: x264 constant rate factor (lower = better, 18 is visually lossless).
        preset: x264 speed preset.

    Raises:
        ResourceError: the output cannot be written.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float, *, audio_path: str | Path | None = None,
                 crf: int = 18, preset: str = "veryfast"):
        import ffmpeg

        self.path = str(path)
        self.width, self.height = width, height
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        streams = [video]
        kwargs: dict[str, object] = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": preset,
                                     "r": fps}
        if audio_path is not None:
            streams.append(ffmpeg.input(_file_url(audio_path)).audio)
            kwargs.update(acodec="aac", audio_bitrate="160k")
        if self.path == "-":
            target = "pipe:1"
            kwargs.update(format="mp4", movflags="frag_keyframe+empty_moov+default_base_moof")
        else:
            target = _file_url(self.path)
            kwargs.update(movflags="+faststart")
        out = _global(ffmpeg.output(*streams, target, **kwargs)).overwrite_output()
        self._err_path = None
        self.proc = subprocess.Popen(out.compile(cmd=ffmpeg_exe()), stdin=subprocess.PIPE,
                                     stdout=None if self.path == "-" else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """Append one [H, W, 3] uint8 RGB frame."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame must be [{self.height}, {self.width}, 3] uint8, got {frame.shape} {frame.dtype}")
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame).tobytes())  # type: ignore[union-attr]
        except BrokenPipeError:
            self.close()
            raise
        self.frames += 1

    def close(self) -> None:
        """Finish the file; raises ResourceError if ffmpeg failed."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        err = self.proc.stderr.read() if self.proc.stderr else b""  # type: ignore[union-attr]
        self.proc.wait()
        if self.proc.returncode != 0:
            raise ResourceError(f"ffmpeg could not write {self.path}: {_stderr_line(err or b'')}.")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
