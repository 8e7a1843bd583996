"""Landmark-based lip metrics: LMD and the blendshape error (an AUE analogue).

Both compare MediaPipe's reading of a rendered frame with its reading of the ground-truth
frame, so they measure the mouth's *shape*, which PSNR only sees through pixel alignment.
Landmarks are pixels (x right, y down) at the working resolution.
"""

from __future__ import annotations

import numpy as np

from gstalk.tracking.canonical import LIPS_INNER, LIPS_OUTER

MOUTH_IDS = tuple(dict.fromkeys(LIPS_OUTER + LIPS_INNER))  # 40 lip landmarks
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
