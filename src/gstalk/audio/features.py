"""Audio features per video frame.

The papers feed DeepSpeech logits (or HuBERT/wav2vec2) in a window of 16 audio steps
centred on each video frame. gstalk's default needs no weights: MFCC from
``python_speech_features`` at 50 steps per second (hop 20 ms, window 25 ms), so 16 steps
span 0.32 s, the same span as the peers' DeepSpeech windows. Extractors sit behind the
:class:`AudioFeatureExtractor` protocol so others can be plugged in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gstalk.config import AudioFeatureConfig


class AudioFeatureExtractor(Protocol):
    """Turns mono audio into a sequence of feature steps.

    Attributes:
        name: registry key, recorded in the workspace.
        dim: features per step (C).
        steps_per_second: feature rate in Hz.
        normalisation: ``training`` (steps are standardised with the training clip's
            mean/std afterwards, :func:`training_statistics`), ``utterance`` (the extractor
            normalises each utterance itself) or ``none``.
    """

    name: str
    dim: int
    steps_per_second: float
    normalisation: str

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """[S] float32 mono samples at ``sample_rate`` Hz -> [T, dim] float32 steps."""
        ...


@dataclass(frozen=True)
class MFCCExtractor:
    """MFCC (``python_speech_features.mfcc``) with the log frame energy as coefficient 0."""

    cfg: AudioFeatureConfig
    name: str = "mfcc"
    normalisation: str = "training"  # normalised later with the training clip's mean/std
    block_s: float = 10.0  # seconds of audio per block (memory), any value gives the same features

    @property
    def dim(self) -> int:
        return self.cfg.numcep

    @property
    def steps_per_second(self) -> float:
        return 1.0 / self.cfg.winstep

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """[T, numcep] float32 features of [S] samples at ``sample_rate`` Hz, one step per ``winstep``
        (:func:`framewise`; the result equals the one-shot computation)."""
        from python_speech_features import mfcc

        def compute(y: np.ndarray) -> np.ndarray:
            return mfcc(y, samplerate=sample_rate, winlen=self.cfg.winlen, winstep=self.cfg.winstep,
                        numcep=self.cfg.numcep, nfilt=self.cfg.nfilt, nfft=self.cfg.nfft, appendEnergy=True,
                        winfunc=np.hanning, preemph=0.0)

        return framewise(samples, sample_rate, self.cfg, self.dim, compute, self.block_s)


def n_steps(n_samples: int, sample_rate: int, cfg: AudioFeatureConfig) -> int:
    """Feature steps of ``n_samples`` samples: windows of ``winlen`` every ``winstep`` seconds,
    the last one zero-padded (python_speech_features' framing): 0 for no samples, else
    1 + ceil((S - L) / H) with L, H the window and hop in samples."""
    if n_samples <= 0:
        return 0
    flen = int(math.floor(cfg.winlen * sample_rate + 0.5))  # python_speech_features rounds half up
    step = int(math.floor(cfg.winstep * sample_rate + 0.5))
    return 1 if n_samples <= flen else 1 + int(math.ceil((n_samples - flen) / step))


def framewise(samples: np.ndarray, sample_rate: int, cfg: AudioFeatureConfig, dim: int,
              compute: Callable[[np.ndarray], np.ndarray], block_s: float = 10.0) -> np.ndarray:
    """Run a python_speech_features-style feature function over [S] samples in blocks.

    The samples get a tiny dither (std 1e-5, seeded: keeps log() finite on digital silence)
    and pre-emphasis 0.97; ``compute(y)`` receives a pre-emphasised block [S'] and returns one
    row per ``cfg.winstep`` hop (its own framing, ``preemph=0``). Blocks hold ``block_s``
    seconds of steps, so memory grows with the output (T x dim), not with the FFT frames of the
    whole signal (an hour of audio needed ~3.5 GB in one go); the result equals the one-shot
    computation (dither, pre-emphasis and zero padding are carried across blocks).

    Returns:
        [T, dim] float32 with T = :func:`n_steps`.
    """
    n = int(samples.size)
    total = n_steps(n, sample_rate, cfg)
    if total == 0:
        return np.zeros((0, dim), np.float32)
    flen = int(math.floor(cfg.winlen * sample_rate + 0.5))
    step = int(math.floor(cfg.winstep * sample_rate + 0.5))
    block = max(1, int(block_s / cfg.winstep))  # feature steps per block
    rng = np.random.default_rng(0)
    out = np.empty((total, dim), np.float32)
    buf, start = np.zeros(0), 0  # dithered samples [start, start + len(buf)) carried over
    for f0 in range(0, total, block):
        m = min(block, total - f0)
        a = f0 * step
        b = min(n, a + (m - 1) * step + flen)
        done = start + buf.size
        if b > done:
            new = samples[done:b].astype(np.float64) + rng.normal(0.0, 1e-5, b - done)
            buf = np.concatenate([buf, new])
        x = buf[a - start:b - start]
        y = x.copy()  # pre-emphasis 0.97, continued from the previous block's last sample
        y[1:] -= 0.97 * x[:-1]
        if a > 0:
            y[0] -= 0.97 * buf[a - start - 1]
        out[f0:f0 + m] = compute(y)[:m]
        keep = (f0 + m) * step - 1  # the next block starts at (f0 + m) * step and needs one sample before
        buf, start = buf[max(0, keep - start):], max(start, keep)
    return out


@dataclass(frozen=True)
class CombinedExtractor:
    """Several front ends side by side: their steps concatenated per step ([T, ΣC]).

    All parts share ``cfg`` (so the same hop and step count); its name is the parts' names
    joined with '+', e.g. ``fbank+phones``.
    """

    parts: tuple[AudioFeatureExtractor, ...]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.parts)

    @property
    def steps_per_second(self) -> float:
        return self.parts[0].steps_per_second

    @property
    def normalisation(self) -> str:
        kinds = {getattr(p, "normalisation", "training") for p in self.parts}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        feats = [p(samples, sample_rate) for p in self.parts]
        t = min(f.shape[0] for f in feats)
        return np.concatenate([f[:t] for f in feats], axis=1)


FRONT_ENDS = ("mfcc", "fbank", "phones")


def get_extractor(name: str, cfg: AudioFeatureConfig) -> AudioFeatureExtractor:
    """The feature extractor called ``name``: ``mfcc``, ``fbank``, ``phones``, or parts joined
    with '+' (``fbank+phones``).

    Raises:
        UsageError: an unknown or repeated part (the message lists the known ones).
    """
    from gstalk.errors import UsageError

    parts = [p.strip() for p in str(name).split("+")]
    if any(p not in FRONT_ENDS for p in parts) or len(set(parts)) != len(parts):
        raise UsageError(f"Unknown audio features '{name}'.",
                         hint=f"use one of {', '.join(FRONT_ENDS)}, or several joined with '+' (e.g. fbank+phones)")
    if cfg.phone_units not in ("visemes", "phones"):
        raise UsageError(f"Unknown phone_units '{cfg.phone_units}'.", hint="use visemes or phones")
    made: list[AudioFeatureExtractor] = []
    for p in parts:
        if p == "mfcc":
            made.append(MFCCExtractor(cfg))
        elif p == "fbank":
            from gstalk.audio.fbank import FbankExtractor

            made.append(FbankExtractor(cfg))
        else:
            from gstalk.audio.phones import PhoneExtractor

            made.append(PhoneExtractor(cfg))
    return made[0] if len(made) == 1 else CombinedExtractor(tuple(made))


def training_statistics(extractor: AudioFeatureExtractor, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std [C] that :func:`normalise` applies to every utterance's steps [T, C]:
    the training clip's own statistics for the columns of a front end normalised that way
    (``normalisation == "training"``: MFCC), and 0 / 1 (no change) for the columns of front
    ends that normalise each utterance themselves (fbank's CMVN) or need none (phones)."""
    parts = extractor.parts if isinstance(extractor, CombinedExtractor) else (extractor,)
    mean = np.zeros(steps.shape[1], np.float32)
    std = np.ones(steps.shape[1], np.float32)
    c = 0
    for p in parts:
        if getattr(p, "normalisation", "training") == "training" and steps.shape[0]:
            mean[c:c + p.dim] = steps[:, c:c + p.dim].mean(0)
            std[c:c + p.dim] = steps[:, c:c + p.dim].std(0)
        c += p.dim
    return mean, std


def n_video_frames(n_samples: int, sample_rate: int, fps: float) -> int:
    """Frames a video of the audio's length has: round(duration_s * fps)."""
    return int(round(n_samples / sample_rate * fps))


def frame_windows(steps: np.ndarray, n_frames: int, fps: float, steps_per_second: float, window: int,
                  offset_frames: int = 0) -> np.ndarray:
    """Cut a window of feature steps centred on each video frame.

    Video frame ``i`` (time ``(i + offset_frames) / fps`` s) is centred on step
    ``c = round((i + offset_frames) * steps_per_second / fps)`` and takes steps
    ``c - window//2 .. c + window//2 - 1``; steps outside the audio are zeros (silence after
    normalisation).

    Args:
        steps: [T, C] float32 feature steps.
        n_frames: N, video frames to produce.
        fps: video frame rate (Hz).
        steps_per_second: feature rate (Hz).
        window: W, steps per frame.
        offset_frames: shift of the audio against the video in frames: a positive value
            pairs frame ``i`` with the audio of frame ``i + offset`` (audio that is late).

    Returns:
        [N, W, C] float32.
    """
    t_steps, c = steps.shape
    centres = np.round((np.arange(n_frames) + offset_frames) * steps_per_second / fps).astype(np.int64)
    idx = centres[:, None] + np.arange(-(window // 2), window - window // 2)[None, :]
    valid = (idx >= 0) & (idx < t_steps)
    out = np.zeros((n_frames, window, c), np.float32)
    if t_steps:
        out[valid] = steps[np.clip(idx, 0, t_steps - 1)][valid]
    return out


def normalise(steps: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-coefficient standardisation with the training audio's statistics: [T, C] -> [T, C]."""
    return ((steps - mean) / np.maximum(std, 1e-6)).astype(np.float32)
