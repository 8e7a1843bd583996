"""Probe media files with PyAV (imageio-ffmpeg ships no ffprobe)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from gstalk.errors import InputError


@dataclass(frozen=True)
class VideoInfo:
    """The first video stream.

    Attributes:
        width, height: displayed size in pixels (after rotation metadata is applied).
        fps: average frame rate in frames per second.
        n_frames: frame count from the container (0 when unknown).
        duration_s: stream duration in seconds (0.0 when unknown).
        codec: decoder name, e.g. ``h264``.
        rotation: display rotation in degrees (0, 90, 180, 270) from the metadata.
        variable_rate: True if the average and the base frame rate differ (VFR).
    """

    width: int
    height: int
    fps: float
    n_frames: int
    duration_s: float
    codec: str
    rotation: int
    variable_rate: bool


@dataclass(frozen=True)
class AudioInfo:
    """The first audio stream: ``sample_rate`` in Hz, ``channels``, ``duration_s`` in seconds."""

    sample_rate: int
    channels: int
    duration_s: float
    codec: str


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe` found in a file; ``video``/``audio`` are None when absent."""

    path: Path
    format: str
    duration_s: float
    video: VideoInfo | None
    audio: AudioInfo | None


def _seconds(duration: int | None, time_base: Fraction | None) -> float:
    if duration is None or time_base is None:
        return 0.0
    return float(duration * time_base)


def probe(path: str | Path) -> MediaInfo:
    """Read the container and stream headers of a media file.

    Args:
        path: a local file.

    Raises:
        InputError: the file is missing, empty, or not a media file ffmpeg can read.
    """
    import av  # lazily: PyAV loads the ffmpeg libraries

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file.", path=path,
                         hint="check the path (quote names with spaces); `ls` the folder")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes).", hint="check the download or copy", path=path)
    try:
        with av.open(str(path)) as c:
            fmt = c.format.name
            dur = c.duration / 1e6 if c.duration else 0.0
            video = audio = None
            if c.streams.video:
                s = c.streams.video[0]
                rotation = 0
                try:
                    frame = next(c.decode(s))
                    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
                    w, h = frame.width, frame.height
                except (StopIteration, av.error.FFmpegError):
                    w, h = s.codec_context.width, s.codec_context.height
                if rotation in (90, 270):
                    w, h = h, w
                avg = s.average_rate or s.guessed_rate or s.base_rate
                base = s.base_rate or avg
                fps = float(avg) if avg else 0.0
                video = VideoInfo(
                    width=int(w), height=int(h), fps=fps, n_frames=int(s.frames or 0),
                    duration_s=_seconds(s.duration, s.time_base) or dur,
                    codec=s.codec_context.name, rotation=rotation,
                    variable_rate=bool(avg and base and abs(float(avg) - float(base)) > 0.01 * float(base)),
                )
            if c.streams.audio:
                a = c.streams.audio[0]
                audio = AudioInfo(sample_rate=int(a.codec_context.sample_rate or a.rate or 0),
                                  channels=int(a.codec_context.channels or 0),
                                  duration_s=_seconds(a.duration, a.time_base) or dur,
                                  codec=a.codec_context.name)
    except av.error.FFmpegError as exc:
        raise InputError(f"{path} is not a media file that ffmpeg can read ({exc.strerror or exc}).",
                         hint="give a video file such as .mp4/.mov/.mkv", path=path) from None
    if video is None and audio is None:
        raise InputError(f"{path} has no video or audio stream.", path=path)
    return MediaInfo(path=path, format=fmt, duration_s=dur, video=video, audio=audio)
