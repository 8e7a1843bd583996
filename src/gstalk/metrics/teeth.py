"""Teeth and the inner mouth: how much of the footage's teeth a render shows, and how close its
open mouth is in pixels.

The inner mouth is the polygon of MediaPipe's 20 inner-lip landmarks (:data:`INNER_LIP_IDS`,
the ring between the lips), filled at whole pixels with OpenCV. Inside it, a pixel counts as
teeth when it is bright and unsaturated (HSV value ≥ :data:`TEETH_MIN_VALUE` and saturation ≤
:data:`TEETH_MAX_SATURATION`, OpenCV's definitions scaled to [0, 1]): lips, tongue and the dark
of the mouth are saturated or dark. The thresholds were checked by eye on the held-out frames
of obama, aoc_hdtf and woman-grey-coat (three skin tones and lightings); they read enamel, not
a tooth count, so compare a render with its own footage, not clips with each other.

Images are [H, W, 3] uint8 RGB; landmarks [478, 2+] pixels, x right and y down.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# MediaPipe face-mesh inner-lip ring, in order round the mouth (upper lip 78 -> 308, lower back)
INNER_LIP_IDS = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
TEETH_MIN_VALUE = 0.45  # HSV value, max(R, G, B) / 255 (OpenCV's V / 255)
TEETH_MAX_SATURATION = 0.45  # HSV saturation, (max - min) / max (OpenCV's S / 255, rounded to a level)


def inner_mouth_mask(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W] bool: the inner-lip polygon of one face's MediaPipe landmarks [478, 2+] (px),
    filled (its vertices rounded to whole pixels). A closed mouth gives few or no pixels.

    Raises:
        ValueError: fewer than 478 landmarks.
    """
    import cv2

    lm = np.asarray(landmarks)
    if lm.ndim != 2 or lm.shape[0] < 478 or lm.shape[1] < 2:
        raise ValueError(f"inner_mouth_mask needs MediaPipe's 478 landmarks [478, 2+], got {list(lm.shape)}")
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(lm[list(INNER_LIP_IDS), :2]).astype(np.int32)], 1)
    return mask.astype(bool)


def teeth_pixels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[H, W] bool: the pixels of ``mask`` [H, W] whose colour in ``image`` [H, W, 3] uint8 RGB
    is bright and unsaturated (:data:`TEETH_MIN_VALUE`, :data:`TEETH_MAX_SATURATION`)."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2HSV)  # S, V in 0..255
    s, v = hsv[..., 1] / 255.0, hsv[..., 2] / 255.0
    return np.asarray(mask, bool) & (v >= TEETH_MIN_VALUE) & (s <= TEETH_MAX_SATURATION)


def teeth_scores(renders: Sequence[np.ndarray], render_landmarks: Sequence[np.ndarray],
                 truths: Sequence[np.ndarray], truth_landmarks: Sequence[np.ndarray]) -> dict[str, float]:
    """Teeth and inner-mouth scores of renders against their ground-truth frames.

    Each image is measured inside its own inner mouth (a render's from the landmarks read on
    it): the teeth it shows. The inner-mouth PSNR compares the render with the ground truth
    inside the ground truth's inner mouth (every such pixel of every frame pooled).

    Args:
        renders, truths: F images each, [H, W, 3] uint8 RGB.
        render_landmarks, truth_landmarks: F arrays [478, 2+] px (MediaPipe's points).

    Returns:
        {"teeth_ratio": the renders' teeth pixels over the ground truth's (NaN when the ground
        truth shows none), "teeth_px": mean teeth pixels per render, "teeth_px_truth": the same
        per ground-truth frame, "teeth_frames_truth": frames whose ground truth shows any,
        "inner_mouth_psnr": dB (NaN when no ground-truth mouth is open), "inner_mouth_px": mean
        ground-truth inner-mouth pixels per frame}.

    Raises:
        ValueError: the four sequences differ in length, or are empty.
    """
    n = len(renders)
    if n == 0 or not (len(render_landmarks) == len(truths) == len(truth_landmarks) == n):
        raise ValueError(f"teeth_scores needs as many renders, truths and landmark sets (>= 1), got "
                         f"{n}, {len(truths)}, {len(render_landmarks)}, {len(truth_landmarks)}")
    rend_px, true_px, frames_with, se, inner = 0, 0, 0, 0.0, 0
    for r, rl, t, tl in zip(renders, render_landmarks, truths, truth_landmarks):
        h, w = t.shape[:2]
        rend_px += int(teeth_pixels(r, inner_mouth_mask(rl, h, w)).sum())
        mask = inner_mouth_mask(tl, h, w)
        tp = int(teeth_pixels(t, mask).sum())
        true_px += tp
        frames_with += tp > 0
        if mask.any():
            d = r[mask].astype(np.float64) / 255.0 - t[mask].astype(np.float64) / 255.0
            se += float((d * d).sum())
            inner += int(mask.sum())
    mse = se / (3 * inner) if inner else float("nan")
    return {"teeth_ratio": rend_px / true_px if true_px else float("nan"), "teeth_px": rend_px / n,
            "teeth_px_truth": true_px / n, "teeth_frames_truth": float(frames_with),
            "inner_mouth_psnr": float(-10.0 * np.log10(max(mse, 1e-12))) if inner else float("nan"),
            "inner_mouth_px": inner / n}
