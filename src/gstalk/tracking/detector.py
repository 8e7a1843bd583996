"""Face landmark detectors behind one interface, chosen by name (:func:`get_detector`).

- ``mediapipe`` (default), :class:`MediaPipeDetector`: MediaPipe's FaceLandmarker (Tasks
  API) with the model bundle shipped in ``gstalk/assets``: 478 landmarks, 52 blendshapes
  and a 4x4 facial transformation per face, about 50 frames/s on 2 cores in VIDEO mode.
- ``fan``, :class:`gstalk.tracking.fan.FANDetector`: face-alignment's 2D-FAN-4 network from
  a TorchScript file the user names, 68 iBUG landmarks in the boxes MediaPipe finds.

Neither downloads anything. :mod:`gstalk.tracking.schemes` tells the two layouts apart.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from gstalk.tracking.canonical import model_path

N_LANDMARKS = 478
N_BLENDSHAPES = 52


@dataclass(frozen=True)
class FaceDetection:
    """One detected face in one image.

    Attributes:
        landmarks: [478, 3] float32: x, y in pixels (pixel centres at +0.5 as MediaPipe's
            normalised coordinates times the image size), z in the same pixel scale
            (relative depth, smaller = closer to the camera).
        blendshapes: [52] float32 scores in [0, 1] (ARKit names, see ``names``).
        transform: [4, 4] float32 MediaPipe facial transformation (canonical face model in
            centimetres to MediaPipe's virtual camera), or zeros when not available.
        names: the 52 blendshape names, in order.
        box: [4] float32 (x0, y0, x1, y1) px, the face box the landmarks were placed in, for a
            detector that works in a box (FAN: MediaPipe's landmark box), else None.
        scores: [L] float32 per-landmark confidence (FAN: heatmap maxima), else None.

    FAN's faces have ``landmarks`` [68, 3] (z = 0), ``blendshapes`` [0], ``names`` ().
    """

    landmarks: np.ndarray
    blendshapes: np.ndarray
    transform: np.ndarray
    names: tuple[str, ...]
    box: np.ndarray | None = None
    scores: np.ndarray | None = None

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the landmarks, in pixels."""
        xy = self.landmarks[:, :2]
        return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())

    @property
    def size(self) -> float:
        """Face size in pixels: the larger side of the landmark box."""
        x0, y0, x1, y1 = self.bbox
        return max(x1 - x0, y1 - y0)


class LandmarkDetector(Protocol):
    """Detects faces in RGB images, frame after frame."""

    name: str

    def detect(self, image: np.ndarray, timestamp_ms: int | None = None) -> list[FaceDetection]:
        """[H, W, 3] uint8 RGB image -> faces, largest first. ``timestamp_ms`` is required in
        video mode and must increase."""
        ...

    def close(self) -> None: ...


class MediaPipeDetector:
    """MediaPipe FaceLandmarker.

    Args:
        video: VIDEO running mode (temporal tracking between frames) if True, else IMAGE.
        num_faces: at most this many faces are returned.
        model: a ``face_landmarker.task`` file; defaults to the bundled one.
        min_confidence: detection / presence / tracking confidence thresholds.

    Raises:
        DependencyError: the model file is missing.
    """

    name = "mediapipe"

    def __init__(self, *, video: bool = True, num_faces: int = 2, model: str | Path | None = None,
                 min_confidence: float = 0.5):
        os.environ.setdefault("GLOG_minloglevel", "2")  # keep MediaPipe's C++ logs off stderr
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp_image = __import__("mediapipe").Image
        self._srgb = __import__("mediapipe").ImageFormat.SRGB
        opts = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(model or model_path())),
            running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
            num_faces=num_faces,
            min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        with _quiet_stderr():
            self._lm = vision.FaceLandmarker.create_from_options(opts)
        self.video = video

    def detect(self, image: np.ndarray, timestamp_ms: int | None = None) -> list[FaceDetection]:
        h, w = image.shape[:2]
        # PyAV / slicing can hand us non-contiguous arrays; MediaPipe then silently finds nothing.
        img = self._mp_image(image_format=self._srgb, data=np.ascontiguousarray(image[..., :3]))
        if self.video:
            if timestamp_ms is None:
                raise ValueError("timestamp_ms is required in video mode")
            res = self._lm.detect_for_video(img, int(timestamp_ms))
        else:
            res = self._lm.detect(img)
        faces = []
        for k, lms in enumerate(res.face_landmarks):
            lm = np.array([[p.x * w, p.y * h, p.z * w] for p in lms], np.float32)
            names: tuple[str, ...] = ()
            bs = np.zeros(N_BLENDSHAPES, np.float32)
            if res.face_blendshapes and k < len(res.face_blendshapes):
                cats = res.face_blendshapes[k]
                names = tuple(c.category_name for c in cats)
                bs = np.array([c.score for c in cats], np.float32)
            tf = np.zeros((4, 4), np.float32)
            if res.facial_transformation_matrixes and k < len(res.facial_transformation_matrixes):
                tf = np.asarray(res.facial_transformation_matrixes[k], np.float32)
            faces.append(FaceDetection(lm, bs, tf, names))
        faces.sort(key=lambda f: -f.size)
        return faces

    def close(self) -> None:
        if getattr(self, "_lm", None) is not None:
            with contextlib.suppress(Exception):
                self._lm.close()
            self._lm = None

    def __enter__(self) -> MediaPipeDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@contextlib.contextmanager
def _quiet_stderr():  # type: ignore[no-untyped-def]
    """Silence C-level stderr (TFLite's 'Created delegate' lines) while the model loads."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


DETECTORS = ("mediapipe", "fan")


def get_detector(name: str = "mediapipe", **kwargs: object) -> LandmarkDetector:
    """The detector called ``name``: ``mediapipe`` (keyword arguments of
    :class:`MediaPipeDetector`) or ``fan`` (of :class:`gstalk.tracking.fan.FANDetector`:
    ``weights`` or ``model``, ``video``, ``num_faces``).

    Raises:
        UsageError: unknown name. InputError: FAN's weights file is refused.
    """
    from gstalk.errors import UsageError

    if name == "mediapipe":
        return MediaPipeDetector(**kwargs)  # type: ignore[arg-type]
    if name == "fan":
        from gstalk.tracking.fan import FANDetector

        return FANDetector(**kwargs)  # type: ignore[arg-type]
    raise UsageError(f"Unknown landmark detector '{name}'.", hint=f"use one of: {', '.join(DETECTORS)}")
