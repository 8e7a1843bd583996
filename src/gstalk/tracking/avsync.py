"""Audio/video offset of the training clip from the mouth opening against the audio.

Real clips are often off by a few frames (``obama.mp4``'s audio is about 5 frames late).
The lag that maximises the correlation between the per-frame mouth opening and what the
audio says of it is the offset: the opening the multi-speaker articulation prior predicts
(:func:`estimate_offset_predicted`, gstalk's default front end) or, without it, the log
RMS energy (the mouth opens when the voice is loud; weaker: correlations of 0.1-0.25 on
clips where the prior reaches 0.4-0.6). A peak below :data:`MIN_CONFIDENT_CORR` is not
applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gstalk.tracking.schemes import face_height, scheme_of


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over face height, per frame: [N, L, >=2] -> [N] (unitless).

    L = 478 (MediaPipe: points 13-14 over forehead-chin) or 68 (iBUG: 62-66 over the
    equivalent rigid face height, :func:`~gstalk.tracking.schemes.face_height`).
    """
    s = scheme_of(landmarks)
    gap = np.linalg.norm(landmarks[:, s.upper_lip_inner, :2] - landmarks[:, s.lower_lip_inner, :2], axis=1)
    return gap / np.maximum(face_height(landmarks), 1e-6)


def log_energy(samples: np.ndarray, sample_rate: int, fps: float, n_frames: int) -> np.ndarray:
    """Log RMS energy of the audio in each video frame's interval: [N] float64."""
    hop = sample_rate / fps
    out = np.full(n_frames, np.log(1e-4))
    for i in range(n_frames):
        seg = samples[int(round(i * hop)):int(round((i + 1) * hop))]
        if seg.size:
            out[i] = 0.5 * np.log(np.mean(seg.astype(np.float64) ** 2) + 1e-8)
    return out


# A peak correlation below this is no evidence of an offset: mismatched audio and video score
# r ≈ 0.07 on average and below 0.24 in 95 % of pairs (the leave-one-out regression check of
# the shared speaker clips), so weaker peaks are left unapplied (offset 0, "not confident").
MIN_CONFIDENT_CORR = 0.3


@dataclass(frozen=True)
class AVOffset:
    """Estimated offset: ``frames`` > 0 means the audio is late (frame i goes with audio i+frames).

    Attributes:
        frames: the offset applied (0 when not ``confident``).
        correlation: the correlation at the best lag; correlation_at_zero: at lag 0.
        curve: lag -> correlation.
        best_lag: the lag where the curve peaks (applied only when ``confident``).
        confident: ``correlation`` >= :data:`MIN_CONFIDENT_CORR`.
        method: what the mouth was correlated with: ``energy`` (the audio's loudness) or
            ``prior`` (the opening the multi-speaker articulation prior predicts).
    """

    frames: int
    correlation: float
    correlation_at_zero: float
    curve: dict[int, float]
    best_lag: int = 0
    confident: bool = True
    method: str = "energy"


def offset_from_curve(curve: dict[int, float], method: str, min_corr: float = MIN_CONFIDENT_CORR) -> AVOffset:
    """The :class:`AVOffset` of a lag -> correlation curve: the peak's lag when its correlation
    reaches ``min_corr``, else 0 (not confident)."""
    best = max(curve, key=lambda k: curve[k])
    confident = curve[best] >= min_corr
    return AVOffset(frames=int(best) if confident else 0, correlation=curve[best],
                    correlation_at_zero=curve.get(0, 0.0), curve=curve, best_lag=int(best), confident=confident,
                    method=method)


def estimate_offset_predicted(landmarks: np.ndarray, predicted: np.ndarray, max_lag: int = 10) -> AVOffset:
    """The offset from the tracked mouth opening against the opening predicted from the audio
    (e.g. by the articulation prior, speaker-independent): ``predicted`` [N] any units."""
    return offset_from_curve(correlate_lags(mouth_opening(landmarks), np.asarray(predicted, np.float64), max_lag),
                             "prior")


def correlate_lags(mouth: np.ndarray, audio: np.ndarray, max_lag: int) -> dict[int, float]:
    """Pearson correlation of mouth[i] with audio[i + lag] for lag in [-max_lag, max_lag]."""
    n = min(len(mouth), len(audio))
    out = {}
    for lag in range(-max_lag, max_lag + 1):
        a = mouth[max(0, -lag):n - max(0, lag)]
        b = audio[max(0, lag):n - max(0, -lag)]
        if len(a) < 3 or a.std() < 1e-12 or b.std() < 1e-12:
            out[lag] = 0.0
        else:
            out[lag] = float(np.corrcoef(a, b)[0, 1])
    return out


def estimate_offset(landmarks: np.ndarray, samples: np.ndarray, sample_rate: int, fps: float,
                    max_lag: int = 10) -> AVOffset:
    """Estimate the audio/video offset of a clip.

    Args:
        landmarks: [N, L, >=2] per-frame landmarks (pixels; 478 or 68 points).
        samples: [S] mono audio.
        sample_rate: Hz.
        fps: video frame rate.
        max_lag: frames searched each way.
    """
    mouth = mouth_opening(landmarks)
    energy = log_energy(samples, sample_rate, fps, len(landmarks))
    return offset_from_curve(correlate_lags(mouth, energy, max_lag), "energy")
