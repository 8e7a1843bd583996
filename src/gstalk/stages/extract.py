"""Stage 1, ``gstalk extract``: video -> square frames, 16 kHz audio, audio features.

Writes ``ws/extract/``:

- ``frames/NNNNNN.png``: RGB frames, ``size`` x ``size`` px, resampled to ``fps``;
- ``audio.wav``: the audio track, 16 kHz mono PCM-16;
- ``audio_features.safetensors``: ``steps`` [T, C] normalised feature steps (50 Hz) of the
  front end ``audio.features`` (``gstalk.audio``), ``windows`` [N, 16, C] the window centred
  on each frame, ``mean``/``std`` [C] the training statistics new speech is normalised with
  (0 / 1 for the columns of front ends that normalise each utterance themselves);
- ``summary.json``: frame count, fps, size, the crop in source pixels, the train/test split.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from gstalk.audio import frame_windows, get_extractor, normalise
from gstalk.audio.features import training_statistics
from gstalk.config import ExtractConfig, to_dict
from gstalk.errors import InputError, TrackingError
from gstalk.media import probe, read_audio, read_video_frames, write_wav
from gstalk.progress import SILENT, Reporter
from gstalk.tensorio import save_tensors
from gstalk.workspace import (
    AUDIO_FEATURES,
    EXTRACT_AUDIO,
    EXTRACT_FRAMES,
    EXTRACT_SUMMARY,
    Workspace,
    atomic_dir,
    run_stage,
    sha256_file,
    write_json,
)

MIN_DURATION_S = 2.0  # shorter clips cannot be split into train and test frames
DETECT_MAX_SIDE = 640  # px, frames (or tiles) are scaled to at most this for the one-off face detection
TILE_MAX_SIDE = 1280  # px, frames are decoded at most this large for the detection (tiles: small faces)
MAX_UPSCALE = 2.0  # the crop may be enlarged at most this much to --size (else: face too small)


def default_workspace(video: Path) -> Path:
    """``<video stem>_ws`` beside the current directory, e.g. ``obama.mp4`` -> ``obama_ws``."""
    return Path(f"{video.stem}_ws")


def split(n_frames: int, test_fraction: float) -> tuple[int, int]:
    """(n_train, n_test): the last ``round(n * test_fraction)`` frames (at least 1) are test."""
    n_test = max(1, int(round(n_frames * test_fraction)))
    return n_frames - n_test, n_test


def min_face_px(size: int, crop_scale: float) -> float:
    """Smallest face (landmark box, source pixels) that ``size`` px working frames accept:
    the crop (``crop_scale`` x the face) may be upscaled at most ``MAX_UPSCALE`` times."""
    return size / (crop_scale * MAX_UPSCALE)


def tile_windows(width: int, height: int, grid: int = 3) -> list[tuple[int, int, int, int]]:
    """Overlapping windows of half the frame, ``grid`` x ``grid`` of them, covering it:
    [(x, y, w, h)] in pixels. Used to find faces too small for the whole-frame detector."""
    tw, th = max(1, width // 2), max(1, height // 2)
    xs = np.linspace(0, width - tw, grid).round().astype(int)
    ys = np.linspace(0, height - th, grid).round().astype(int)
    return [(int(x), int(y), tw, th) for y in ys for x in xs]


def choose_face(boxes: list[tuple[float, float, float, float]], width: int, height: int) -> int:
    """Index of the face to crop around among several in one frame: the largest; among
    faces within 10% of the largest, the one nearest the frame centre, then the leftmost.
    The track stage follows the largest face too (``pick_face``).

    Args:
        boxes: (x0, y0, x1, y1) per face, pixels.
        width, height: frame size in pixels.
    """
    sizes = [max(b[2] - b[0], b[3] - b[1]) for b in boxes]
    big = max(sizes)
    cands = [i for i, s in enumerate(sizes) if s >= 0.9 * big]

    def key(i: int) -> tuple[float, float]:
        x0, y0, x1, y1 = boxes[i]
        return (round(float(np.hypot((x0 + x1) / 2 - width / 2, (y0 + y1) / 2 - height / 2)), 1), x0)

    return min(cands, key=key)


def merge_overlaps(boxes: list[tuple[float, float, float, float]], iou: float = 0.3
                   ) -> list[tuple[float, float, float, float]]:
    """Drop boxes (x0, y0, x1, y1) overlapping a larger kept one by more than ``iou``
    (intersection over union): one face seen by two overlapping tiles counts once."""
    kept: list[tuple[float, float, float, float]] = []
    for b in sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        ok = True
        for k in kept:
            ix = max(0.0, min(b[2], k[2]) - max(b[0], k[0]))
            iy = max(0.0, min(b[3], k[3]) - max(b[1], k[1]))
            inter = ix * iy
            union = (b[2] - b[0]) * (b[3] - b[1]) + (k[2] - k[0]) * (k[3] - k[1]) - inter
            if union > 0 and inter / union > iou:
                ok = False
                break
        if ok:
            kept.append(b)
    return kept


def _detect(det: Any, frame: np.ndarray, tiles: bool) -> list[tuple[float, float, float, float]]:
    """Face boxes (x0, y0, x1, y1) in ``frame`` pixels: on the whole frame scaled to at most
    ``DETECT_MAX_SIDE`` px, or (``tiles``) on each :func:`tile_windows` window scaled likewise
    (2x closer, for small faces; overlapping windows may report one face twice)."""
    import cv2

    h, w = frame.shape[:2]
    windows = tile_windows(w, h) if tiles else [(0, 0, w, h)]
    out = []
    for x, y, tw, th in windows:
        s = DETECT_MAX_SIDE / max(tw, th)
        img = frame[y:y + th, x:x + tw]
        img = cv2.resize(img, (max(2, int(round(tw * s))), max(2, int(round(th * s)))),
                         interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        for f in det.detect(np.ascontiguousarray(img)):
            x0, y0, x1, y1 = f.bbox
            out.append((x + x0 / s, y + y0 / s, x + x1 / s, y + y1 / s))
    return out


def find_crop(video: Path, src_size: tuple[int, int], duration_s: float, cfg: ExtractConfig,
              samples: int = 5, src_fps: float = 25.0) -> tuple[tuple[int, int, int, int], dict[str, Any]]:
    """Detect the face in a few frames and choose a square crop around head and shoulders.

    The frames are decoded at most ``TILE_MAX_SIDE`` px wide; faces are looked for in the
    whole frame, and if none is found anywhere, in overlapping half-frame tiles (small or
    distant faces). With several faces, :func:`choose_face` picks one (the largest). The side
    is ``crop_scale`` x the median face size (landmark box), clamped to the frame; the centre
    is the median face centre moved down by ``crop_shift`` x side, then the square is shifted
    to lie inside the frame.

    Args:
        video: the input video.
        src_size: (width, height) displayed, pixels.
        duration_s: length in seconds; samples: frames looked at, spread over the clip;
        src_fps: the video's frame rate (to name source frames in messages).

    Returns:
        ((x, y, side, side) in source pixels, info dict: the face box and size, ``faces_seen``
        (most faces in one sampled frame), ``multi_face_at_s`` (times of frames with several),
        ``small_face_search`` (True when found only in tiles)).

    Raises:
        TrackingError: no face in any sampled frame, or the face is smaller than
            :func:`min_face_px` for ``cfg.size`` (file, time and source frame named).
    """
    from gstalk.tracking.detector import MediaPipeDetector

    w, h = src_size
    scale = min(1.0, TILE_MAX_SIDE / max(w, h))
    dw, dh = max(2, int(round(w * scale / 2)) * 2), max(2, int(round(h * scale / 2)) * 2)
    fps = max(samples / max(duration_s, 1e-3), 0.01)
    frames = []
    for frame in read_video_frames(video, fps=fps, size=(dw, dh), src_size=src_size):
        frames.append(frame)
        if len(frames) >= samples:
            break
    sx, sy = w / dw, h / dh
    boxes, times, multi = [], [], []
    faces_seen, in_tiles = 0, False
    with MediaPipeDetector(video=False, num_faces=3) as det:
        for in_tiles in (False, True):
            for k, frame in enumerate(frames):
                found = merge_overlaps(_detect(det, frame, in_tiles))
                if not found:
                    continue
                faces_seen = max(faces_seen, len(found))
                if len(found) > 1:
                    multi.append(round(k / fps, 2))
                x0, y0, x1, y1 = found[choose_face(found, dw, dh)]
                boxes.append([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
                times.append(k / fps)
            if boxes:
                break
    if not boxes:
        raise TrackingError(f"No face found in {video} (looked at {len(frames)} frames across the clip, also "
                            "zoomed in for small faces).",
                            hint="use a video with one face looking at the camera, well lit", path=video)
    x0, y0, x1, y1 = np.median(np.asarray(boxes), axis=0)
    face = max(x1 - x0, y1 - y0)
    need = min_face_px(cfg.size, cfg.crop_scale)
    if face < need:
        t = times[len(times) // 2]
        largest = int(face * cfg.crop_scale * MAX_UPSCALE) // 32 * 32
        fix = "film closer to the face or at a higher resolution"
        if largest >= 64:
            fix += f", or extract at --size {largest} or less"
        raise TrackingError(f"The face in {video} is only {face:.0f} px across (e.g. at {t:.1f} s, source frame "
                            f"{int(round(t * src_fps))}); --size {cfg.size} needs at least {need:.0f} px "
                            f"(the crop would be enlarged more than {MAX_UPSCALE:g}x).", hint=fix, path=video)
    side = int(min(cfg.crop_scale * face, w, h)) // 2 * 2
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2 + cfg.crop_shift * side
    x = int(round(np.clip(cx - side / 2, 0, w - side)))
    y = int(round(np.clip(cy - side / 2, 0, h - side)))
    face_in_output = face * cfg.size / side
    return (x, y, side, side), {"face_box_src": [float(v) for v in (x0, y0, x1, y1)],
                                "face_size_src_px": float(face), "face_size_px": float(face_in_output),
                                "faces_seen": faces_seen, "multi_face_at_s": multi, "small_face_search": in_tiles}


def source_crop_side(video: str | Path, cfg: ExtractConfig) -> float | None:
    """The side, in the video's pixels, of the head-and-shoulders crop extract would take
    (:func:`find_crop`), or None when the video cannot tell (no video stream, no face: extract
    itself then says why)."""
    video = Path(video)
    try:
        info = probe(video)
        if info.video is None:
            return None
        duration = info.video.duration_s or info.duration_s
        crop, _ = find_crop(video, (info.video.width, info.video.height), duration, cfg,
                            src_fps=info.video.fps or cfg.fps)
    except (InputError, TrackingError):
        return None
    return float(crop[2])


# a separate speech file may fall short of the video's end by this much (an encoder's last
# frame, a trimmed silence); beyond it the last frames would have no audio
SPEECH_SHORTFALL_S = 0.5


def run_extract(video: str | Path, workspace: str | Path | None, cfg: ExtractConfig, *, preset: str, seed: int = 0,
                speech: str | Path | None = None, reporter: Reporter = SILENT) -> Workspace:
    """Run the extract stage.

    Args:
        video: input video with one speaker and (unless ``speech`` is given) an audio track.
        workspace: workspace folder (created if needed); None: ``<video stem>_ws``.
        cfg: the stage config (``size`` px, ``fps``, crop and audio settings).
        preset: preset name recorded in the manifest for later stages.
        seed: random seed recorded in the manifest.
        speech: the speaker's voice in a separate file (any file ffmpeg reads with an audio
            track), used instead of the video's audio: for videos without sound or with
            another track. It must start with the video (sample 0 = frame 0) and last as
            long, to within :data:`SPEECH_SHORTFALL_S`.

    Returns:
        The workspace.

    Raises:
        InputError: not a video, no audio (in the video or in ``speech``), ``speech`` shorter
            than the video, too short. Raised before the workspace is created or written.
        TrackingError: no face found for the crop.
        ResourceError: the workspace cannot be written.
    """
    t0 = time.perf_counter()
    video = Path(video)
    info = probe(video)
    if info.video is None:
        raise InputError(f"{video} has no video stream (audio only?).",
                         hint="extract needs the training video of the speaker", path=video)
    duration = info.video.duration_s or info.duration_s
    if speech is None and info.audio is None:
        raise InputError(f"{video} has no audio track.",
                         hint="the training video must contain the speaker's voice; if it is in a separate file, "
                              "give it with --speech FILE (it must start with the video)", path=video)
    if speech is not None:
        speech = Path(speech)
        sp = probe(speech)
        if sp.audio is None:
            raise InputError(f"{speech} has no audio track.", hint="--speech takes a file with the speaker's voice "
                                                                  "(wav, mp3, m4a, flac, a video...)", path=speech)
        speech_s = sp.audio.duration_s or sp.duration_s
        if speech_s + SPEECH_SHORTFALL_S < duration:
            raise InputError(f"{speech} lasts {speech_s:.2f} s, the video {duration:.2f} s: the speech must cover "
                             "the whole video, starting with its first frame.",
                             hint="give the speech recorded with this video, or cut the video to it "
                                  f"(ffmpeg -i {video.name} -t {speech_s:.2f} -c copy OUT.mp4)", path=speech)
    if duration < MIN_DURATION_S:
        raise InputError(f"{video} is {duration:.2f} s long; gstalk needs at least {MIN_DURATION_S:.0f} s "
                         "(3-5 minutes for a good model).", hint="record a longer clip", path=video)

    source: dict[str, Any] = {"path": str(video.resolve()), "sha256": sha256_file(video)}
    if speech is not None:
        source["speech"] = {"path": str(speech.resolve()), "sha256": sha256_file(speech)}
    ws = Workspace.create(workspace or default_workspace(video), preset=preset, seed=seed, source=source)
    run_stage(ws, "extract", to_dict(cfg), lambda: _extract(video, ws, cfg, info, duration, reporter, speech),
              started=t0)
    return ws


def _extract(video: Path, ws: Workspace, cfg: ExtractConfig, info: Any, duration: float,
             reporter: Reporter, speech: Path | None = None) -> dict[str, Any]:
    import cv2

    src = (info.video.width, info.video.height)
    reporter.log(f"[bold]extract[/bold] {video} ({src[0]}x{src[1]}, {info.video.fps:.2f} fps, {duration:.1f} s)")
    if info.video.rotation:
        reporter.log(f"  rotation metadata {info.video.rotation}°: frames are turned upright "
                     f"({src[0]}x{src[1]} as displayed)")
    crop, face = find_crop(video, src, duration, cfg, src_fps=info.video.fps or cfg.fps)
    if face["faces_seen"] > 1:
        x0, _, x1, _ = face["face_box_src"]
        at = ", ".join(f"{t:g} s" for t in face["multi_face_at_s"][:3])
        reporter.warn(f"{face['faces_seen']} faces in {video} (at {at}): cropping around the largest (the one "
                      f"nearest the centre when alike), x {x0:.0f}-{x1:.0f} px; the track stage follows it. If "
                      "that is the wrong person, crop the video to the speaker (ffmpeg -vf crop=W:H:X:Y) and "
                      "re-run extract")
    expected = int(round(duration * cfg.fps))
    out_dir = ws.path("extract")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_dir(ws.path(EXTRACT_FRAMES)) as tmp, reporter.task("decoding frames", expected) as bar:
        for frame in read_video_frames(video, fps=cfg.fps, crop=crop, size=cfg.size, src_size=src):
            ok, buf = cv2.imencode(".png", frame[:, :, ::-1])
            if not ok:
                raise InputError(f"Frame {n} of {video} could not be encoded as PNG.", path=video)
            (tmp / f"{n:06d}.png").write_bytes(buf.tobytes())  # OSError (disk full) -> ResourceError
            n += 1
            bar.advance()
        if n == 0:
            raise InputError(f"No frames could be decoded from {video}.", path=video)
        if n < 0.95 * expected - 1:  # inside atomic_dir: the partial frames are discarded
            raise InputError(f"{video} is truncated or damaged: only {n} of {expected} frames "
                             f"({n / cfg.fps:.2f} s of {duration:.2f} s) could be decoded.",
                             hint="use the complete file, or re-encode it: ffmpeg -i IN -c:v libx264 -c:a aac OUT.mp4",
                             path=video)

    if info.video.variable_rate:
        reporter.log(f"  variable frame rate ({info.video.n_frames or '?'} frames, {info.video.fps:.2f} fps on "
                     f"average): resampled by timestamp to {cfg.fps:g} fps, {n} frames")
    samples = read_audio(speech or video, cfg.audio.sample_rate)
    if speech is not None:
        samples = samples[:int(round(n / cfg.fps * cfg.audio.sample_rate))]  # the video's length: its frames'
        reporter.log(f"  speech from {speech} ({samples.size / cfg.audio.sample_rate:.2f} s used)")
    write_wav(ws.path(EXTRACT_AUDIO), samples, cfg.audio.sample_rate)
    extractor = get_extractor(cfg.audio.features, cfg.audio)
    with reporter.task(f"audio features ({extractor.name})", 1) as bar:
        steps = extractor(samples, cfg.audio.sample_rate)
        bar.advance()
    mean, std = training_statistics(extractor, steps)
    steps_n = normalise(steps, mean, std)
    windows = frame_windows(steps_n, n, cfg.fps, extractor.steps_per_second, cfg.audio.window)
    meta = {"extractor": extractor.name, "dim": extractor.dim, "steps_per_second": extractor.steps_per_second,
            "window": cfg.audio.window, "fps": cfg.fps, "sample_rate": cfg.audio.sample_rate,
            "normalisation": extractor.normalisation}
    save_tensors(ws.path(AUDIO_FEATURES),
                 {"steps": steps_n, "windows": windows, "mean": mean, "std": std}, meta)

    n_train, n_test = split(n, cfg.test_fraction)
    summary = {
        "n_frames": n, "fps": cfg.fps, "size": cfg.size,
        "crop": {"x": crop[0], "y": crop[1], "side": crop[2]},
        "source": {"width": src[0], "height": src[1], "fps": info.video.fps, "duration_s": duration,
                   "rotation": info.video.rotation, "variable_rate": info.video.variable_rate,
                   "n_frames": info.video.n_frames,
                   "audio_sample_rate": info.audio.sample_rate if info.audio is not None else None,
                   "speech": str(speech) if speech is not None else None},
        "face": face,
        "audio": {"duration_s": samples.size / cfg.audio.sample_rate, **meta, "feature_steps": int(steps.shape[0])},
        "split": {"train": [0, n_train], "test": [n_train, n]},
        "frames_format": "png",
    }
    write_json(ws.path(EXTRACT_SUMMARY), summary)
    reporter.log(f"  {n} frames at {cfg.size}x{cfg.size}, crop {crop[2]} px at ({crop[0]}, {crop[1]}), "
                 f"{n_train} train / {n_test} test, audio {samples.size / cfg.audio.sample_rate:.2f} s")
    return summary
