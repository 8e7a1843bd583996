"""Speed perturbation of speech, for fitting the articulation prior on more voices.

Playing a recording back α times faster shortens it by α and scales every frequency by α:
pitch and formants move together, as they do between a shorter and a longer vocal tract.
ASR systems train on copies of their corpus at α = 0.9 and 1.1 for that reason (Ko et al.,
"Audio augmentation for speech recognition", Interspeech 2015). The prior's corpus is 20
speakers; the copies show it each voice higher and lower. The video side follows the same
clock: frame ``j`` of the perturbed clip shows the mouth of original time ``j·α / fps``
(:func:`resample_frames`).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def speed_ratio(speed: float) -> Fraction:
    """``speed`` as the up/down resampling ratio 1/α, as a fraction of small integers
    (α = 0.9 → 10/9, 1.1 → 10/11).

    Raises:
        ValueError: ``speed`` outside [0.5, 2] or not finite."""
    if not (np.isfinite(speed) and 0.5 <= speed <= 2.0):
        raise ValueError(f"speed {speed} is out of range: give a factor in [0.5, 2] (1 = unchanged)")
    return Fraction(1.0 / speed).limit_denominator(100)


def speed_perturb(samples: np.ndarray, speed: float) -> np.ndarray:
    """The recording played ``speed`` times faster at the same sample rate: [S] float32 ->
    [≈ S / speed] float32 (polyphase resampling with scipy's anti-aliasing filter; the
    duration scales by 1/speed, every frequency by speed). ``speed`` 1 returns a copy."""
    from scipy.signal import resample_poly

    ratio = speed_ratio(speed)
    x = np.asarray(samples, np.float32)
    if ratio == 1:
        return x.copy()
    return resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32)


def shift_audio(samples: np.ndarray, sample_rate: int, seconds: float) -> np.ndarray:
    """Advance the audio by ``seconds`` (> 0: what was heard at ``t + seconds`` is heard at
    ``t``; < 0: delay it), keeping its length, the gap filled with silence: [S] -> [S].
    A clip whose audio is late by ``d`` seconds is in sync after ``shift_audio(x, sr, d)``."""
    x = np.asarray(samples, np.float32)
    k = int(round(seconds * sample_rate))
    out = np.zeros_like(x)
    if abs(k) >= len(x):  # shifted past either end: silence
        return out
    if k >= 0:
        out[:len(x) - k] = x[k:]
    else:
        out[-k:] = x[:len(x) + k]
    return out


def resample_frames(values: np.ndarray, speed: float) -> np.ndarray:
    """Per-frame values [N, ...] on the perturbed clip's clock: frame ``j`` takes the value
    at original frame ``j·speed`` (linear interpolation), for ``j = 0 .. ⌊(N-1)/speed⌋``:
    -> [M, ...] float64 with M = ⌊(N-1)/speed⌋ + 1."""
    v = np.asarray(values, np.float64)
    n = len(v)
    m = int(np.floor((n - 1) / speed + 1e-9)) + 1
    t = np.minimum(np.arange(m) * speed, n - 1)
    flat = v.reshape(n, -1)
    out = np.stack([np.interp(t, np.arange(n), flat[:, d]) for d in range(flat.shape[1])], axis=1)
    return out.reshape((m,) + v.shape[1:])
