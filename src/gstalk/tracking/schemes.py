"""Landmark schemes: which point is which, for each detector's layout.

gstalk tracks faces with one of two landmark layouts, told apart by their point count:

- ``mediapipe``: MediaPipe's 478-point face mesh (468 mesh vertices + 10 iris points),
  :mod:`gstalk.tracking.canonical`;
- ``ibug68``: the 68-point iBUG 300-W layout that FAN (face-alignment) and dlib use: jaw
  0-16, brows 17-26, nose 27-35, eyes 36-47, outer lips 48-59, inner lips 60-67, the
  subject's right side (image left for a frontal face) first.

Everything downstream of a detector (masks, head pose, mouth opening, blink, mouth box,
LMD) asks the :class:`LandmarkScheme` of its landmarks for the points it needs, so both
layouts go through the same code. Landmarks are pixels, x right, y down.

The 68 points are tied to MediaPipe's canonical face model by :data:`IBUG68_MESH_IDS` (the
mesh vertex that sits where each iBUG point is annotated), which gives FAN tracks a 3D
model for head pose and lets the two layouts measure a face in the same units.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from gstalk.tracking import canonical as mp

# canonical-mesh vertex of each of the 68 iBUG points, chosen on MediaPipe's canonical face:
# jaw and lip contours at equal arc length along the mesh's own contours, eyes at the six
# points of the eye-aspect-ratio literature, nose bridge 168-197-5-1 (1 = MediaPipe's nose
# tip), nose base 98-97-2-326-327. Mirrored pairs map to mirrored vertices (tested).
IBUG68_MESH_IDS = (
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,  # jaw 0-16
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,  # brows 17-26
    168, 197, 5, 1, 98, 97, 2, 326, 327,  # nose 27-35
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes 36-47
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,  # outer lips 48-59
    78, 81, 13, 311, 308, 402, 14, 178,  # inner lips 60-67
)
# iBUG point -> its mirror image (face-alignment's left/right flip order)
IBUG68_MIRROR = (16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
                 27, 28, 29, 30, 35, 34, 33, 32, 31, 45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40, 54, 53, 52, 51,
                 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65)


@dataclass(frozen=True)
class LandmarkScheme:
    """The named points of one landmark layout (indices into its [L, >=2] landmarks).

    Attributes:
        name: ``mediapipe`` or ``ibug68``; n_points: L.
        lips_outer, lips_inner: the lip contours, each a closed polygon.
        mouth_ids: the lip points LMD compares (40 for MediaPipe, 20 = points 48-67 for iBUG).
        upper_lip_inner, lower_lip_inner, upper_lip_outer, lower_lip_outer: lip mid-points.
        mouth_right, mouth_left: the mouth corners (subject's right = image left).
        chin: the lowest point of the chin.
        eye_right, eye_left: six points per eye for the eye aspect ratio, in the order outer
            corner, upper lid (outer, inner), inner corner, lower lid (inner, outer).
        pose_ids: stable (non-deforming) points for head pose and landmark jitter; empty for
            MediaPipe, whose Procrustes basis comes from the shipped model
            (:attr:`~gstalk.tracking.canonical.CanonicalFace.basis_ids`).
        mesh_ids: the canonical-mesh vertex of each point (MediaPipe: the point itself).
    """

    name: str
    n_points: int
    lips_outer: tuple[int, ...]
    lips_inner: tuple[int, ...]
    mouth_ids: tuple[int, ...]
    upper_lip_inner: int
    lower_lip_inner: int
    upper_lip_outer: int
    lower_lip_outer: int
    mouth_right: int
    mouth_left: int
    chin: int
    eye_right: tuple[int, ...]
    eye_left: tuple[int, ...]
    pose_ids: tuple[int, ...]
    mesh_ids: tuple[int, ...]


MEDIAPIPE = LandmarkScheme(
    name="mediapipe", n_points=478, lips_outer=mp.LIPS_OUTER, lips_inner=mp.LIPS_INNER,
    mouth_ids=tuple(dict.fromkeys(mp.LIPS_OUTER + mp.LIPS_INNER)),
    upper_lip_inner=mp.UPPER_LIP_INNER, lower_lip_inner=mp.LOWER_LIP_INNER, upper_lip_outer=0, lower_lip_outer=17,
    mouth_right=mp.MOUTH_RIGHT, mouth_left=mp.MOUTH_LEFT, chin=mp.CHIN,
    eye_right=(33, 160, 158, 133, 153, 144), eye_left=(263, 387, 385, 362, 380, 373),
    pose_ids=(), mesh_ids=tuple(range(468)),
)
IBUG68 = LandmarkScheme(
    name="ibug68", n_points=68, lips_outer=tuple(range(48, 60)), lips_inner=tuple(range(60, 68)),
    mouth_ids=tuple(range(48, 68)), upper_lip_inner=62, lower_lip_inner=66, upper_lip_outer=51, lower_lip_outer=57,
    mouth_right=48, mouth_left=54, chin=8, eye_right=(36, 37, 38, 39, 40, 41), eye_left=(45, 44, 43, 42, 47, 46),
    # nose bridge and base, eye corners, brow ends: none moves with the mouth or the eyelids
    pose_ids=(27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45, 17, 21, 22, 26),
    mesh_ids=IBUG68_MESH_IDS,
)
SCHEMES = {s.name: s for s in (MEDIAPIPE, IBUG68)}


def scheme_of(landmarks: np.ndarray) -> LandmarkScheme:
    """The scheme of landmarks [..., L, >=2] by their point count L (478 or 468: MediaPipe,
    68: iBUG).

    Raises:
        ValueError: any other count.
    """
    n = int(np.shape(landmarks)[-2])
    if n in (478, 468):
        return MEDIAPIPE
    if n == 68:
        return IBUG68
    raise ValueError(f"landmarks have {n} points; gstalk knows 478 (MediaPipe) and 68 (iBUG/FAN)")


@dataclass(frozen=True)
class _Ibug68Geometry:
    height_per_scale: float  # MediaPipe's forehead-chin length / the rigid iBUG scale
    brow_lift: float  # how far (x face height) the forehead line lies above the brows


@lru_cache(maxsize=1)
def _ibug68_geometry() -> _Ibug68Geometry:
    """Constants that make iBUG measurements match MediaPipe's, read off the canonical face."""
    v = mp.canonical_face().vertices[:, :2]
    pts = v[list(IBUG68_MESH_IDS)]
    height = float(np.linalg.norm(v[mp.FOREHEAD] - v[mp.CHIN]))
    brows = pts[17:27, 1].mean()
    return _Ibug68Geometry(height / _rigid_scale(pts[None])[0], float((v[mp.FOREHEAD, 1] - brows) / height))


def _rigid_scale(lm: np.ndarray) -> np.ndarray:
    """[N, 68, >=2] -> [N]: the geometric mean of the outer-eye-corner distance (36-45) and the
    distance from the eyes' midpoint to the nose base (33); neither moves with the mouth, and
    a head turn shrinks one much more than the other."""
    eyes = np.linalg.norm(lm[:, 36, :2] - lm[:, 45, :2], axis=-1)
    mid = 0.5 * (lm[:, 36, :2] + lm[:, 45, :2])
    nose = np.linalg.norm(mid - lm[:, 33, :2], axis=-1)
    return np.sqrt(eyes * nose)


def face_height(landmarks: np.ndarray) -> np.ndarray:
    """Face height in pixels: [..., L, >=2] -> [...].

    MediaPipe: forehead (10) to chin (152). iBUG 68 (no forehead point): a rigid length (eye
    corners and nose base, :func:`_rigid_scale`) times the ratio that makes both equal on the
    canonical face, so the two layouts measure the same face alike.
    """
    lm = np.asarray(landmarks)
    if scheme_of(lm) is MEDIAPIPE:
        return np.linalg.norm(lm[..., mp.FOREHEAD, :2] - lm[..., mp.CHIN, :2], axis=-1)
    flat = lm.reshape(-1, *lm.shape[-2:])
    return (_rigid_scale(flat) * _ibug68_geometry().height_per_scale).reshape(lm.shape[:-2])


def face_outline(landmarks: np.ndarray) -> np.ndarray:
    """A closed polygon around the face, forehead included: [L, >=2] -> [K, 2] px.

    MediaPipe: its 36-point face oval. iBUG 68: the jaw (0-16), then the brows (26 back to
    17) lifted along the chin-to-nose-bridge direction to where MediaPipe's forehead point
    lies on the canonical face.
    """
    lm = np.asarray(landmarks, np.float64)
    if scheme_of(lm) is MEDIAPIPE:
        return lm[list(mp.FACE_OVAL), :2]
    up = lm[27, :2] - lm[8, :2]
    up /= max(float(np.linalg.norm(up)), 1e-9)
    lift = _ibug68_geometry().brow_lift * float(face_height(lm[None])[0])
    return np.concatenate([lm[0:17, :2], lm[26:16:-1, :2] + lift * up], 0)


def eye_aspect_ratio(landmarks: np.ndarray) -> np.ndarray:
    """Eye aspect ratio (Soukupova and Cech 2016), the mean of both eyes: [N, L, >=2] -> [N].

    EAR = (|p2 - p6| + |p3 - p5|) / (2 |p1 - p4|) over each eye's six points
    (:attr:`LandmarkScheme.eye_right`); about 0.25-0.35 open, near 0 closed.
    """
    lm = np.asarray(landmarks, np.float64)
    s = scheme_of(lm)
    out = []
    for eye in (s.eye_right, s.eye_left):
        p = lm[:, list(eye), :2]
        vert = np.linalg.norm(p[:, 1] - p[:, 5], axis=-1) + np.linalg.norm(p[:, 2] - p[:, 4], axis=-1)
        out.append(vert / np.maximum(2.0 * np.linalg.norm(p[:, 0] - p[:, 3], axis=-1), 1e-9))
    return 0.5 * (out[0] + out[1])


def to_ibug68(mediapipe_landmarks: np.ndarray) -> np.ndarray:
    """MediaPipe landmarks [..., 478, D] -> the 68 iBUG points [..., 68, D] (the mesh vertices of
    :data:`IBUG68_MESH_IDS`): an approximation of an iBUG annotation, used to compare the two
    layouts, never as a FAN result."""
    return np.asarray(mediapipe_landmarks)[..., list(IBUG68_MESH_IDS), :]


def eye_boxes(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """A box per eye and frame around the eye and its lids, sized by the eye's corner-to-corner
    width (which a blink does not change): 1.5 x that width across, 1.1 x it tall, centred on
    the corners' midpoint, clamped to the image.

    Args:
        landmarks: [N, L, >=2] pixels (478 MediaPipe or 68 iBUG points).
        width, height: image size, pixels.

    Returns:
        [N, 2, 4] float32 (x0, y0, x1, y1) px, the subject's right eye then the left.
    """
    s = scheme_of(landmarks)
    out = []
    for eye in (s.eye_right, s.eye_left):
        a, b = landmarks[:, eye[0], :2], landmarks[:, eye[3], :2]  # the two corners
        c = (a + b) / 2
        w = np.linalg.norm(a - b, axis=-1).clip(min=2.0)
        box = np.stack([c[:, 0] - 0.75 * w, c[:, 1] - 0.55 * w, c[:, 0] + 0.75 * w, c[:, 1] + 0.55 * w], axis=-1)
        out.append(np.clip(box, 0, [width, height, width, height]))
    return np.stack(out, axis=1).astype(np.float32)
