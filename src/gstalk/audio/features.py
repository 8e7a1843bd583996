"""Audio features per video frame.

The papers feed DeepSpeech logits (or HuBERT/wav2vec2) in a window of 16 audio steps
centred on each video frame. gstalk's default needs no weights: MFCC from
``python_speech_features`` at 50 steps per second (hop 20 ms, window 25 ms), so 16 steps
span 0.32 s, the same span as the peers' DeepSpeech windows. Extractors sit behind the
:class:`AudioFeatureExtractor` protocol so others can be plugged in.
"""

from __future__ import annotations

import math
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
    """

    name: str
    dim: int
    steps_per_second: float

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """[S] float32 mono samples at ``sample_rate`` Hz -> [T, dim] float32 steps."""
        ...


@dataclass(frozen=True)
class MFCCExtractor:
    """MFCC (``python_speech_features.mfcc``) with the log frame energy as coefficient 0."""

    cfg: AudioFeatureConfig
    name: str = "mfcc"
    block_s: float = 10.0  # seconds of audio per block (memory), any value gives the same features

    @property
    def dim(self) -> int:
        return self.cfg.numcep

    @property
    def steps_per_second(self) -> float:
        return 1.0 / self.cfg.winstep

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """[T, numcep] float32 features of [S] samples at ``sample_rate`` Hz, one step per ``winstep``.

        Computed in blocks of ``block_s`` seconds, so memory grows with the output (T x numcep),
        not with the FFT frames of the whole signal (an hour of audio needed ~3.5 GB in one go);
        the result equals the one-shot computation (the dither, pre-emphasis and zero padding
        are carried across blocks).
        """
        from python_speech_features import mfcc

        if samples.size == 0:
            return np.zeros((0, self.dim), np.float32)
        flen = int(math.floor(self.cfg.winlen * sample_rate + 0.5))  # python_speech_features rounds half up
        step = int(math.floor(self.cfg.winstep * sample_rate + 0.5))
        n = int(samples.size)
        total = 1 if n <= flen else 1 + int(math.ceil((n - flen) / step))
        block = max(1, int(self.block_s / self.cfg.winstep))  # feature steps per block
        rng = np.random.default_rng(0)  # tiny dither keeps log() finite on digital silence
        out = np.empty((total, self.dim), np.float32)
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
            feats = mfcc(y, samplerate=sample_rate, winlen=self.cfg.winlen, winstep=self.cfg.winstep,
                         numcep=self.cfg.numcep, nfilt=self.cfg.nfilt, nfft=self.cfg.nfft, appendEnergy=True,
                         winfunc=np.hanning, preemph=0.0)
            out[f0:f0 + m] = feats[:m]
            keep = (f0 + m) * step - 1  # the next block starts at (f0 + m) * step and needs one sample before
            buf, start = buf[max(0, keep - start):], max(start, keep)
        return out


def get_extractor(name: str, cfg: AudioFeatureConfig) -> AudioFeatureExtractor:
    """The feature extractor called ``name`` (only ``mfcc`` ships today)."""
    from gstalk.errors import UsageError

    if name == "mfcc":
        return MFCCExtractor(cfg)
    raise UsageError(f"Unknown audio feature extractor '{name}'.", hint="use 'mfcc'")


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
