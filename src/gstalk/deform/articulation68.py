"""The mouth articulation code from 68 iBUG landmarks alone (FAN tracks, no blendshapes).

:func:`gstalk.deform.articulation.articulation_features` builds the 7-number code from
MediaPipe's landmarks and four of its blendshapes. A face tracked with FAN has 68 points
and no blendshapes, so :func:`articulation_features_68` gives the same seven columns, in
:data:`~gstalk.deform.articulation.ARTICULATION_NAMES` order, from geometry:

- ``inner_opening``, ``outer_opening``: the lip gaps 62-66 and 51-57 over the face height
  (:func:`~gstalk.tracking.schemes.face_height`), as MediaPipe's 13-14 and 0-17;
- ``mouth_width``: the corners 48-54 over the jaw width 0-16 (MediaPipe: cheeks 234-454);
- ``jawOpen``: nose base to the lower lip, 33-57, over the face height;
- ``mouthFunnel``: the outer lips' height over their width, 51-57 / 48-54 (a round "o");
- ``mouthPucker``: the lips' thickness over the mouth width, (51-62 + 57-66) / 48-54 (the
  lips push forward and gather; the forward push itself is invisible in 2D);
- ``mouthClose``: dropped (see :data:`DROPPED`).

Each proxy was chosen among candidates by its correlation with MediaPipe's blendshape on
26 tracked real clips, the 68 points taken from MediaPipe's mesh (median over clips:
jawOpen 0.85, mouthFunnel 0.59, mouthPucker 0.78); ``docs/methods.md`` has the table.
mouthClose had no proxy of its own above 0.5 (the best, lip thickness, is already
mouthPucker's), so it is dropped: returned as a zero column, so the code keeps 7 columns
and every model and regressor works unchanged (a constant column standardises to 0).
"""

from __future__ import annotations

import numpy as np
import torch

from gstalk.deform.articulation import ARTICULATION_NAMES
from gstalk.tracking.schemes import face_height

DROPPED: tuple[str, ...] = ("mouthClose",)


def _dist(lm: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.linalg.norm(lm[:, a, :2] - lm[:, b, :2], axis=-1)


def articulation_features_68(landmarks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Raw (unstandardised) articulation features of each frame from 68 landmarks.

    Args:
        landmarks: [N, 68, >=2] iBUG landmarks in pixels (x right, y down).

    Returns:
        [N, 7] float32 in :data:`~gstalk.deform.articulation.ARTICULATION_NAMES` order
        (see the module docstring); columns of :data:`DROPPED` are 0.

    Raises:
        ValueError: not [N, 68, >=2].
    """
    lm = landmarks.detach().cpu().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    lm = lm.astype(np.float64)
    if lm.ndim != 3 or lm.shape[1] != 68 or lm.shape[2] < 2:
        raise ValueError(f"68-point articulation needs landmarks [N, 68, >=2], got {list(lm.shape)}")
    height = np.maximum(face_height(lm), 1e-6)
    width = np.maximum(_dist(lm, 48, 54), 1e-6)
    cols = {
        "inner_opening": _dist(lm, 62, 66) / height,
        "outer_opening": _dist(lm, 51, 57) / height,
        "mouth_width": _dist(lm, 48, 54) / np.maximum(_dist(lm, 0, 16), 1e-6),
        "jawOpen": _dist(lm, 33, 57) / height,
        "mouthFunnel": _dist(lm, 51, 57) / width,
        "mouthPucker": (_dist(lm, 51, 62) + _dist(lm, 57, 66)) / width,
    }
    out = np.stack([np.zeros(len(lm)) if k in DROPPED else cols[k] for k in ARTICULATION_NAMES], 1)
    return torch.from_numpy(out.astype(np.float32))
