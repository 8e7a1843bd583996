"""Landmark-based lip metrics: LMD and the blendshape error (an AUE analogue).

Both compare a detector's reading of a rendered frame with its reading of the ground-truth
frame, so they measure the mouth's *shape*, which PSNR only sees through pixel alignment.
Landmarks are pixels (x right, y down) at the working resolution.

LMD has two readings in gstalk: MediaPipe's 40 lip points (:data:`MOUTH_IDS`, always), and,
with ``gstalk eval --lmd-landmarks fan``, FAN's 68-point mouth, points 48-67
(:data:`FAN_MOUTH_IDS`), the way ER-NeRF and TalkingGaussian compute it: FAN reads the
render and the ground-truth frame, each mouth is mean-centred, and the mean distance of the
20 points is averaged over the frames.
"""

from __future__ import annotations

import numpy as np

from gstalk.tracking.canonical import LIPS_INNER, LIPS_OUTER

MOUTH_IDS = tuple(dict.fromkeys(LIPS_OUTER + LIPS_INNER))  # 40 lip landmarks
FAN_MOUTH_IDS = tuple(range(48, 68))  # the 68-point layout's mouth, as the papers' LMD takes it
AUE_BLENDSHAPES = ("jawOpen", "mouthClose", "mouthFunnel", "mouthPucker", "mouthLowerDownLeft",
                   "mouthLowerDownRight", "mouthUpperUpLeft", "mouthUpperUpRight")


def lmd(pred: np.ndarray, target: np.ndarray, *, centre: bool = True) -> np.ndarray:
    """Landmark distance per frame: the mean Euclidean distance between corresponding points.

    As in the peers' evaluation code (ER-NeRF, TalkingGaussian), each frame's point set is
    mean-centred first (``centre=True``), so a head that is rendered a pixel off does not
    count as a wrong mouth shape.

    Args:
        pred, target: [F, P, 2+] float landmarks in pixels (only x, y are used).

    Returns:
        [F] float64 pixels.

    Raises:
        ValueError: shapes differ.
    """
    if pred.shape[:2] != target.shape[:2]:
        raise ValueError(f"landmark shapes differ: {pred.shape} vs {target.shape}")
    p = pred[..., :2].astype(np.float64)
    t = target[..., :2].astype(np.float64)
    if centre:
        p = p - p.mean(1, keepdims=True)
        t = t - t.mean(1, keepdims=True)
    return np.linalg.norm(p - t, axis=-1).mean(1)


def mouth_lmd(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """LMD of the mouth per frame (:func:`lmd`, mean-centred) on the mouth points of the
    layout: :data:`MOUTH_IDS` for MediaPipe's [F, 478, 2+], :data:`FAN_MOUTH_IDS` for [F, 68, 2+].

    Returns:
        [F] float64 pixels.

    Raises:
        ValueError: the layouts differ or are neither.
    """
    if pred.shape[1] != target.shape[1] or pred.shape[1] not in (478, 468, 68):
        raise ValueError(f"mouth LMD needs two sets of 478 or 68 landmarks, got {pred.shape} and {target.shape}")
    ids = list(FAN_MOUTH_IDS if pred.shape[1] == 68 else MOUTH_IDS)
    return lmd(pred[:, ids], target[:, ids])


def blendshape_error(pred: np.ndarray, target: np.ndarray, names: tuple[str, ...] | list[str],
                     keys: tuple[str, ...] = AUE_BLENDSHAPES) -> dict[str, float]:
    """Mean absolute error of selected MediaPipe blendshape scores (in [0, 1]).

    The AUE analogue: the papers' AUE compares OpenFace action-unit intensities; these are
    MediaPipe's mouth/jaw blendshapes.

    Args:
        pred, target: [F, 52] float scores; names: the 52 names in column order.
        keys: which blendshapes (those missing from ``names`` are skipped).

    Returns:
        {name: MAE, ..., "mean": MAE over the chosen ones}.
    """
    out: dict[str, float] = {}
    for k in keys:
        if k in names:
            j = list(names).index(k)
            out[k] = float(np.abs(pred[:, j] - target[:, j]).mean())
    out["mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out
