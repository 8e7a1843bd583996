"""Readers of the workspace's per-frame data, shared by the stages that consume it.

Stages never import each other; they read each other's outputs through these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gstalk.errors import WorkspaceError
from gstalk.tensorio import load_tensors
from gstalk.train.frames import FrameSet
from gstalk.workspace import (
    AUDIO_FEATURES,
    COARSE_CAMERAS,
    EXTRACT_AUDIO,
    EXTRACT_FRAMES,
    FINE_MODEL,
    PLATE,
    TRACK_MASKS,
    TRACKS,
    Workspace,
)

if TYPE_CHECKING:
    from gstalk.avatar import AudioSettings


def frame_path(ws: Workspace, i: int) -> Path:
    return ws.path(EXTRACT_FRAMES, f"{i:06d}.png")


def mask_path(ws: Workspace, i: int) -> Path:
    return ws.path(TRACK_MASKS, f"{i:06d}.png")


def _imread(path: Path, flags: int) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), flags)
    if img is None:
        raise WorkspaceError(f"{path} is missing or unreadable.", hint="re-run the stage that writes it", path=path)
    return img


def load_frame(ws: Workspace, i: int) -> np.ndarray:
    """Extracted frame ``i`` as [H, W, 3] uint8 RGB."""
    import cv2

    return np.ascontiguousarray(_imread(frame_path(ws, i), cv2.IMREAD_COLOR)[:, :, ::-1])


def _decoded(fn: Any, indices: range | list[int]) -> list[np.ndarray]:
    """``[fn(i) for i in indices]``, the PNGs decoded on a few worker threads (OpenCV releases
    the GIL while decoding), in order; the first error is raised."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    idx = list(indices)
    workers = min(8, os.cpu_count() or 1, max(1, len(idx) // 16))
    if workers <= 1:
        return [fn(i) for i in idx]
    with ThreadPoolExecutor(workers, thread_name_prefix="gstalk-decode") as pool:
        return list(pool.map(fn, idx))


def load_frames(ws: Workspace, indices: range | list[int] | None = None) -> np.ndarray:
    """Extracted frames as [F, H, W, 3] uint8 RGB (all when ``indices`` is None), decoded on
    worker threads."""
    if indices is None:
        indices = range(ws.stage("extract").summary["n_frames"])
    return np.stack(_decoded(lambda i: load_frame(ws, i), indices))


def load_masks(ws: Workspace, indices: range | list[int]) -> np.ndarray:
    """Track masks as [F, H, W, 4] uint8 {0, 255}, channels head, mouth, torso, person
    (decoded on worker threads)."""
    import cv2

    return np.stack(_decoded(lambda i: _imread(mask_path(ws, i), cv2.IMREAD_UNCHANGED), indices))


def load_background(ws: Workspace) -> np.ndarray:
    """The background plate [H, W, 3] uint8 RGB."""
    import cv2

    return np.ascontiguousarray(_imread(ws.path(PLATE), cv2.IMREAD_COLOR)[:, :, ::-1])


@dataclass
class Tracks:
    """Per-frame tracking results (``track/tracks.safetensors``).

    Attributes:
        viewmats: [N, 4, 4] float32 world(canonical head)-to-camera = smoothed head pose, metres, OpenCV.
        K: [3, 3] float32 intrinsics in pixels.
        landmarks: [N, L, 3] float32 pixels: L = 478 MediaPipe (z in the same pixel scale) or
            68 iBUG from FAN (z = 0); ``detector`` says which.
        blendshapes: [N, 52] float32 ([N, 0] for FAN tracks).
        blink: [N] float32 eye blink in [0, 1].
        valid: [N] bool, False for interpolated frames.
        mouth_box: [N, 4] float32 (x0, y0, x1, y1) pixels, a square around the mouth.
        face_box: [N, 4] float32 (x0, y0, x1, y1) pixels of the landmarks.
        blendshape_names: the 52 blendshape names, in column order (() for FAN tracks).
        detector: the track stage's detector, ``mediapipe`` or ``fan``.
    """

    viewmats: torch.Tensor
    K: torch.Tensor
    landmarks: torch.Tensor
    blendshapes: torch.Tensor
    blink: torch.Tensor
    valid: torch.Tensor
    mouth_box: torch.Tensor
    face_box: torch.Tensor
    blendshape_names: tuple[str, ...] = ()
    detector: str = "mediapipe"

    @property
    def has_articulation(self) -> bool:
        """Whether :meth:`articulation` can be computed (MediaPipe's blendshape names, or 68 points)."""
        return bool(self.blendshape_names) or self.landmarks.shape[1] == 68

    def articulation(self) -> torch.Tensor:
        """[N, 7] float32 raw mouth articulation features
        (:func:`~gstalk.deform.articulation.articulation_features`; for FAN's 68 points
        :func:`~gstalk.deform.articulation68.articulation_features_68`)."""
        if self.landmarks.shape[1] == 68:
            from gstalk.deform.articulation68 import articulation_features_68

            return articulation_features_68(self.landmarks)
        from gstalk.deform.articulation import articulation_features

        return articulation_features(self.landmarks, self.blendshapes, self.blendshape_names)


def load_tracks(ws: Workspace) -> Tracks:
    t, meta = load_tensors(ws.path(TRACKS))
    return Tracks(viewmats=t["viewmats"].float(), K=t["K"].float(), landmarks=t["landmarks"].float(),
                  blendshapes=t["blendshapes"].float(), blink=t["blink"].float(), valid=t["valid"].bool(),
                  mouth_box=t["mouth_box"].float(), face_box=t["face_box"].float(),
                  blendshape_names=tuple(meta.get("blendshape_names", ())),
                  detector=str(meta.get("detector", "mediapipe")))


@dataclass
class Cameras:
    """The per-frame cameras the model is trained, rendered and evaluated with.

    Attributes:
        viewmats: [N, 4, 4] float32 world(canonical head)-to-camera of every frame (OpenCV,
            metres): the coarse stage's refined poses, or the track stage's.
        K: [3, 3] float32 intrinsics in pixels.
        refined: whether ``viewmats`` are the coarse stage's refined poses
            (``coarse/cameras.safetensors``) rather than the tracked ones.
    """

    viewmats: torch.Tensor
    K: torch.Tensor
    refined: bool


def load_cameras(ws: Workspace, which: str = "auto") -> Cameras:
    """Every frame's camera: ``which="auto"`` gives the coarse stage's refined poses when its
    run is done and wrote them (``coarse/cameras.safetensors``, gstalk with pose refinement),
    else the tracked ones; ``"tracked"`` always the track stage's (what the coarse stage
    starts from).

    Raises:
        WorkspaceError: the tracks or the cameras file is missing or unreadable.
        ValueError: an unknown ``which``.
    """
    if which not in ("auto", "tracked"):
        raise ValueError(f"which must be 'auto' or 'tracked', got {which!r}")
    path = ws.path(COARSE_CAMERAS)
    if which == "auto" and ws.stage("coarse").status == "done" and path.is_file():
        t, _ = load_tensors(path)
        return Cameras(viewmats=t["viewmats"].float(), K=t["K"].float(), refined=True)
    tracks = load_tracks(ws)
    return Cameras(viewmats=tracks.viewmats, K=tracks.K, refined=False)


@dataclass
class AudioFeatures:
    """``extract/audio_features.safetensors``: normalised steps [T, C], their mean/std [C] and rate."""

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    steps_per_second: float
    window: int
    extractor: str


def load_audio_features(ws: Workspace) -> AudioFeatures:
    t, meta = load_tensors(ws.path(AUDIO_FEATURES))
    return AudioFeatures(steps=t["steps"].numpy(), mean=t["mean"].numpy(), std=t["std"].numpy(),
                         steps_per_second=float(meta["steps_per_second"]), window=int(meta["window"]),
                         extractor=str(meta["extractor"]))


def load_audio(ws: Workspace) -> tuple[np.ndarray, int]:
    """The extracted audio ``extract/audio.wav``: ([S] float32 mono in [-1, 1], sample rate Hz)."""
    import soundfile as sf

    samples, sr = sf.read(str(ws.path(EXTRACT_AUDIO)), dtype="float32")
    return (samples.mean(1) if samples.ndim > 1 else samples), int(sr)


def load_audio_settings(ws: Workspace) -> AudioSettings:
    """The workspace's audio-feature settings (:class:`~gstalk.avatar.AudioSettings`): the
    extract stage's audio config, and the metadata and small tensors of
    ``extract/audio_features.safetensors`` (all but the clip's own ``steps``/``windows``)."""
    from gstalk.avatar import PER_FRAME_AUDIO_TENSORS, AudioSettings

    t, meta = load_tensors(ws.path(AUDIO_FEATURES))
    ex = ws.stage("extract")
    return AudioSettings(config=dict(ex.config.get("audio", {})), metadata=meta,
                         tensors={k: v.numpy() for k, v in t.items() if k not in PER_FRAME_AUDIO_TENSORS},
                         fps=float(ex.summary["fps"]))


def read_speech(audio: AudioSettings, path: str | Path) -> tuple[np.ndarray, int]:
    """Any audio file ffmpeg reads (wav, mp3, m4a, flac, ...; any rate; stereo is mixed to
    mono), resampled to the rate of the avatar's audio features ``audio``: ([S] float32, Hz).
    Memory is the output's (an hour at 16 kHz: 230 MB), whatever the input's format.

    Raises:
        InputError: missing or unreadable, no audio stream, or no samples (0 s).
    """
    from gstalk.errors import InputError
    from gstalk.media import read_audio

    rate = audio.sample_rate
    samples = read_audio(path, rate)  # streamed: memory ~4 bytes per output sample
    if samples.size == 0:
        raise InputError(f"{path} contains no audio samples (0 s).",
                         hint="give a file with speech in it (check that it plays)", path=path)
    return samples, rate


def speech_windows(audio: AudioSettings, samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Feature windows of new speech for the model, one per output video frame (A/V offset 0):
    [N, W, C] float32 with N = round(duration · fps), normalised with the training clip's
    statistics (``audio.tensors["mean"]``/``["std"]``). ``samples`` [S] at ``sample_rate`` Hz
    (from :func:`read_speech`); ``audio``: the avatar's settings (:func:`load_audio_settings`,
    or a bundle's)."""
    from gstalk.audio import frame_windows, get_extractor, n_video_frames, normalise
    from gstalk.config import AudioFeatureConfig, from_dict

    fps = audio.fps
    extractor = get_extractor(audio.extractor, from_dict(AudioFeatureConfig, audio.config))
    steps = normalise(extractor(samples, sample_rate), audio.tensors["mean"], audio.tensors["std"])
    n = n_video_frames(samples.size, sample_rate, fps)
    return frame_windows(steps, n, fps, extractor.steps_per_second, audio.window, 0)


def split_indices(ws: Workspace) -> tuple[range, range]:
    """(train frames, test frames) as ranges, from the extract summary."""
    s = ws.stage("extract").summary["split"]
    return range(*s["train"]), range(*s["test"])


def composite_background(frame: np.ndarray, masks: np.ndarray, plate: np.ndarray) -> np.ndarray:
    """What lies behind the head in one frame: the frame's torso over the background plate.

    Args:
        frame: [H, W, 3] uint8; masks: [H, W, 4] uint8 (head, mouth, torso, person);
        plate: [H, W, 3] uint8.

    Returns:
        [H, W, 3] uint8.
    """
    return composite_torso(frame, masks[..., 2], plate)


def composite_torso(frame: np.ndarray, torso_mask: np.ndarray, plate: np.ndarray) -> np.ndarray:
    """A frame's torso over a plate: frame [H, W, 3] uint8, torso_mask [H, W] uint8 (0..255,
    the torso's coverage), plate [H, W, 3] uint8 -> [H, W, 3] uint8."""
    torso = torso_mask[..., None].astype(np.float32) / 255.0
    return (frame * torso + plate * (1.0 - torso)).round().astype(np.uint8)


class PoseFrameTorso:
    """The background source of a workspace trained without the torso field: frame ``i``'s
    own torso, read from disk. Calling it gives (rgb [H, W, 3] uint8, torso mask [H, W] uint8).

    Args:
        root: the workspace folder (kept as a path, so the object pickles small).

    Raises:
        WorkspaceError: (on call) the frame or its mask is missing or unreadable.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ws = Workspace(self.root)
        return load_frame(ws, i), load_masks(ws, [i])[0][..., 2]


def build_frameset(ws: Workspace, indices: range | list[int], *, audio_offset: int | None = None,
                   cameras: str = "auto", codes: bool = False) -> FrameSet:
    """Load frames, backgrounds, cameras, masks and (optionally) audio windows into a
    :class:`~gstalk.train.frames.FrameSet`.

    Args:
        indices: workspace frame numbers.
        cameras: ``auto`` (the coarse stage's refined poses when there are some, else the
            tracked ones) or ``tracked`` (:func:`load_cameras`).
        audio_offset: None to skip audio; else the A/V offset in frames applied when cutting
            the feature windows (frame i gets the window of audio frame i + offset).
        codes: load the mouth articulation code of every frame without audio too (the
            coarse stage's articulation basis). With audio or ``codes`` it is loaded,
            standardised with the statistics of ``indices``, when the tracks can give it
            (:attr:`Tracks.has_articulation`); otherwise ``FrameSet.articulation`` is None.
    """
    from gstalk.audio import frame_windows

    idx = list(indices)
    tracks = load_tracks(ws)
    cams = load_cameras(ws, cameras)
    plate = load_background(ws)
    images = load_frames(ws, idx)
    masks = load_masks(ws, idx)
    bgs = np.stack([composite_background(images[j], masks[j], plate) for j in range(len(idx))])
    audio = articulation = None
    if audio_offset is not None:
        af = load_audio_features(ws)
        fps = float(ws.stage("extract").summary["fps"])
        n_all = int(ws.stage("extract").summary["n_frames"])
        win = frame_windows(af.steps, n_all, fps, af.steps_per_second, af.window, offset_frames=audio_offset)
        audio = torch.from_numpy(win)
    if (audio_offset is not None or codes) and tracks.has_articulation:
        from gstalk.deform.articulation import standardise

        articulation = standardise(tracks.articulation(), idx)
    sel = torch.tensor(idx, dtype=torch.long)
    from gstalk.tracking.schemes import eye_boxes

    eyes = torch.from_numpy(eye_boxes(tracks.landmarks[sel].numpy(), images.shape[2], images.shape[1]))
    return FrameSet(
        images=torch.from_numpy(images), backgrounds=torch.from_numpy(bgs), viewmats=cams.viewmats[sel],
        K=cams.K, head_masks=torch.from_numpy(np.ascontiguousarray(masks[..., 0])),
        mouth_masks=torch.from_numpy(np.ascontiguousarray(masks[..., 1])), mouth_boxes=tracks.mouth_box[sel],
        blink=tracks.blink[sel], audio=audio, frame_ids=sel, articulation=articulation,
        torso_masks=torch.from_numpy(np.ascontiguousarray(masks[..., 2])), plate=torch.from_numpy(plate),
        eye_boxes=eyes,
    )


def load_fine_model(ws: Workspace, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """(canonical Gaussians, deformation model in eval mode, metadata) from
    ``fine/model.safetensors``, on ``device`` (whatever device trained it)."""
    t, meta = load_tensors(ws.path(FINE_MODEL))
    params, model = fine_model_from_tensors(t, meta, device)
    return params, model, meta


def fine_model_from_tensors(t: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device | str = "cpu"
                            ) -> tuple[dict[str, torch.Tensor], Any]:
    """(canonical Gaussians, deformation model in eval mode) from the tensors and metadata of
    a ``fine/model.safetensors`` file (``params.*``, ``module.*``, ``meta["spec"]``), on
    ``device`` (``map_location``: the file holds CPU tensors whatever device trained it).

    Raises:
        KeyError, RuntimeError, UsageError: the spec or the weights do not fit together
            (callers name the file).
    """
    from gstalk.deform.registry import build_model

    params = {k.split(".", 1)[1]: v.to(device) for k, v in t.items() if k.startswith("params.")}
    model = build_model(meta["spec"])
    model.load_state_dict({k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("module.")})
    model.to(device)
    model.eval()
    return params, model
