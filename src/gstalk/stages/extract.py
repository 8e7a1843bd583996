"""Stage 1, ``gstalk extract``: video -> square frames, 16 kHz audio, audio features.

Writes ``ws/extract/``:

- ``frames/NNNNNN.png``: RGB frames, ``size`` x ``size`` px, resampled to ``fps``;
- ``audio.wav``: the audio track, 16 kHz mono PCM-16;
- ``audio_features.safetensors``: ``steps`` [T, C] normalised MFCC steps (50 Hz),
  ``windows`` [N, 16, C] the window centred on each frame, ``mean``/``std`` [C];
- ``summary.json``: frame count, fps, size, the crop in source pixels, the train/test split.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from gstalk.audio import frame_windows, get_extractor, normalise
from gstalk.config import ExtractConfig, to_dict
from gstalk.errors import InputError, TrackingError
from gstalk.media import probe, read_audio, read_video_frames, write_wav
from gstalk.progress import SILENT, Reporter
from gstalk.tensorio import save_tensors
from gstalk.workspace import Workspace, atomic_dir, clean_temp, sha256_file, write_json

MIN_DURATION_S = 2.0  # shorter clips cannot be split into train and test frames
DETECT_MAX_SIDE = 640  # px, frames are scaled to at most this for the one-off face detection


def default_workspace(video: Path) -> Path:
    """``<video stem>_ws`` beside the current directory, e.g. ``obama.mp4`` -> ``obama_ws``."""
    return Path(f"{video.stem}_ws")


def split(n_frames: int, test_fraction: float) -> tuple[int, int]:
    """(n_train, n_test): the last ``round(n * test_fraction)`` frames (at least 1) are test."""
    n_test = max(1, int(round(n_frames * test_fraction)))
    return n_frames - n_test, n_test


def find_crop(video: Path, src_size: tuple[int, int], duration_s: float, cfg: ExtractConfig,
              samples: int = 5) -> tuple[tuple[int, int, int, int], dict[str, Any]]:
    """Detect the face in a few frames and choose a square crop around head and shoulders.

    The side is ``crop_scale`` x the median face size (landmark box), clamped to the frame;
    the centre is the median face centre moved down by ``crop_shift`` x side, then the
    square is shifted to lie inside the frame.

    Returns:
        ((x, y, side, side) in source pixels, info dict with the face box and size).

    Raises:
        TrackingError: no face in any sampled frame, or the face is too small.
    """
    from gstalk.tracking.detector import MediaPipeDetector

    w, h = src_size
    scale = min(1.0, DETECT_MAX_SIDE / max(w, h))
    dw, dh = int(round(w * scale / 2)) * 2, int(round(h * scale / 2)) * 2
    fps = max(samples / max(duration_s, 1e-3), 0.01)
    boxes = []
    with MediaPipeDetector(video=False, num_faces=3) as det:
        for frame in read_video_frames(video, fps=fps, size=(dw, dh), src_size=src_size):
            faces = det.detect(frame)
            if faces:
                x0, y0, x1, y1 = faces[0].bbox
                boxes.append([x0 / scale, y0 / scale, x1 / scale, y1 / scale])
            if len(boxes) >= samples:
                break
    if not boxes:
        raise TrackingError(f"No face found in {video} (looked at {samples} frames across the clip).",
                            hint="use a video with one face looking at the camera, well lit", path=video)
    x0, y0, x1, y1 = np.median(np.asarray(boxes), axis=0)
    face = max(x1 - x0, y1 - y0)
    side = int(min(cfg.crop_scale * face, w, h)) // 2 * 2
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2 + cfg.crop_shift * side
    x = int(round(np.clip(cx - side / 2, 0, w - side)))
    y = int(round(np.clip(cy - side / 2, 0, h - side)))
    face_in_output = face * cfg.size / side
    return (x, y, side, side), {"face_box_src": [float(v) for v in (x0, y0, x1, y1)],
                                "face_size_src_px": float(face), "face_size_px": float(face_in_output)}


def run_extract(video: str | Path, workspace: str | Path | None, cfg: ExtractConfig, *, preset: str, seed: int = 0,
                reporter: Reporter = SILENT) -> Workspace:
    """Run the extract stage.

    Args:
        video: input video with one speaker and an audio track.
        workspace: workspace folder (created if needed); None: ``<video stem>_ws``.
        cfg: the stage config (``size`` px, ``fps``, crop and audio settings).
        preset: preset name recorded in the manifest for later stages.
        seed: random seed recorded in the manifest.

    Returns:
        The workspace.

    Raises:
        InputError: not a video, no audio, too short.
        TrackingError: no face found for the crop.
        ResourceError: the workspace cannot be written.
    """
    t0 = time.perf_counter()
    video = Path(video)
    info = probe(video)
    if info.video is None:
        raise InputError(f"{video} has no video stream (audio only?).",
                         hint="extract needs the training video of the speaker", path=video)
    if info.audio is None:
        raise InputError(f"{video} has no audio track.",
                         hint="the training video must contain the speaker's voice", path=video)
    duration = info.video.duration_s or info.duration_s
    if duration < MIN_DURATION_S:
        raise InputError(f"{video} is {duration:.2f} s long; gstalk needs at least {MIN_DURATION_S:.0f} s "
                         "(3-5 minutes for a good model).", hint="record a longer clip", path=video)

    ws = Workspace.create(workspace or default_workspace(video), preset=preset, seed=seed,
                          source={"path": str(video.resolve()), "sha256": sha256_file(video)})
    with ws.lock("extract"):
        clean_temp(ws.path("extract"))
        ws.begin("extract", to_dict(cfg))
        try:
            summary = _extract(video, ws, cfg, info, duration, reporter)
        except BaseException as exc:
            ws.fail("extract", str(exc) or type(exc).__name__)
            raise
        outputs = ["extract/frames", "extract/audio.wav", "extract/audio_features.safetensors",
                   "extract/summary.json"]
        ws.finish("extract", outputs=outputs, summary=summary, seconds=time.perf_counter() - t0)
    return ws


def _extract(video: Path, ws: Workspace, cfg: ExtractConfig, info: Any, duration: float,
             reporter: Reporter) -> dict[str, Any]:
    import cv2

    src = (info.video.width, info.video.height)
    reporter.log(f"[bold]extract[/bold] {video} ({src[0]}x{src[1]}, {info.video.fps:.2f} fps, {duration:.1f} s)")
    crop, face = find_crop(video, src, duration, cfg)
    expected = int(round(duration * cfg.fps))
    out_dir = ws.path("extract")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_dir(out_dir / "frames") as tmp, reporter.task("decoding frames", expected) as bar:
        for frame in read_video_frames(video, fps=cfg.fps, crop=crop, size=cfg.size, src_size=src):
            cv2.imwrite(str(tmp / f"{n:06d}.png"), frame[:, :, ::-1])
            n += 1
            bar.advance()
        if n == 0:
            raise InputError(f"No frames could be decoded from {video}.", path=video)
        if n < 0.95 * expected - 1:  # inside atomic_dir: the partial frames are discarded
            raise InputError(f"{video} is truncated or damaged: only {n} of {expected} frames "
                             f"({n / cfg.fps:.2f} s of {duration:.2f} s) could be decoded.",
                             hint="use the complete file, or re-encode it: ffmpeg -i IN -c:v libx264 -c:a aac OUT.mp4",
                             path=video)

    samples = read_audio(video, cfg.audio.sample_rate)
    write_wav(out_dir / "audio.wav", samples, cfg.audio.sample_rate)
    extractor = get_extractor("mfcc", cfg.audio)
    steps = extractor(samples, cfg.audio.sample_rate)
    mean, std = steps.mean(0), steps.std(0)
    steps_n = normalise(steps, mean, std)
    windows = frame_windows(steps_n, n, cfg.fps, extractor.steps_per_second, cfg.audio.window)
    meta = {"extractor": extractor.name, "dim": extractor.dim, "steps_per_second": extractor.steps_per_second,
            "window": cfg.audio.window, "fps": cfg.fps, "sample_rate": cfg.audio.sample_rate}
    save_tensors(out_dir / "audio_features.safetensors",
                 {"steps": steps_n, "windows": windows, "mean": mean, "std": std}, meta)

    n_train, n_test = split(n, cfg.test_fraction)
    summary = {
        "n_frames": n, "fps": cfg.fps, "size": cfg.size,
        "crop": {"x": crop[0], "y": crop[1], "side": crop[2]},
        "source": {"width": src[0], "height": src[1], "fps": info.video.fps, "duration_s": duration,
                   "rotation": info.video.rotation, "audio_sample_rate": info.audio.sample_rate},
        "face": face,
        "audio": {"duration_s": samples.size / cfg.audio.sample_rate, **meta, "feature_steps": int(steps.shape[0])},
        "split": {"train": [0, n_train], "test": [n_train, n]},
        "frames_format": "png",
    }
    write_json(out_dir / "summary.json", summary)
    reporter.log(f"  {n} frames at {cfg.size}x{cfg.size}, crop {crop[2]} px at ({crop[0]}, {crop[1]}), "
                 f"{n_train} train / {n_test} test, audio {samples.size / cfg.audio.sample_rate:.2f} s")
    return summary
