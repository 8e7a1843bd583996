"""Log mel filter-bank features with per-utterance mean/variance normalisation (CMVN).

MFCC normalised with the *training* clip's statistics carry the training microphone, level and
voice timbre into every new utterance: another speaker's speech lands off the distribution the
audio → mouth map was fitted on. Normalising every utterance by its own statistics (cepstral
mean and variance normalisation, as speech recognisers do; here on log filter-bank energies)
removes a constant gain exactly (a gain g adds log g² to every log energy, which the mean
subtracts) and most of a fixed channel or timbre colouring, for the training video and new
speech alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gstalk.audio.features import framewise
from gstalk.config import AudioFeatureConfig

CMVN_FLOOR = 1e-3  # smallest std a band is divided by (a constant band stays finite)


def cmvn(steps: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> np.ndarray:
    """Mean/variance normalisation per feature: (x − μ) / max(σ, 1e-3).

    Args:
        steps: [T, C] float features.
        mean, std: [C] statistics to use; default the utterance's own (over its T steps).

    Returns:
        [T, C] float32 (zeros for T = 0).
    """
    x = np.asarray(steps, np.float64)
    if x.shape[0] == 0:
        return np.zeros(x.shape, np.float32)
    mu = x.mean(0) if mean is None else np.asarray(mean, np.float64)
    sd = x.std(0) if std is None else np.asarray(std, np.float64)
    return ((x - mu) / np.maximum(sd, CMVN_FLOOR)).astype(np.float32)


@dataclass(frozen=True)
class FbankExtractor:
    """Log mel filter-bank energies (``python_speech_features.fbank``: ``nfilt`` bands,
    Hann windows of ``winlen`` every ``winstep`` s, pre-emphasis 0.97), CMVN over the
    utterance (:func:`cmvn`).

    Output: [T, nfilt] float32, zero mean and unit variance per band over the utterance.
    """

    cfg: AudioFeatureConfig
    name: str = "fbank"
    normalisation: str = "utterance"
    block_s: float = 10.0

    @property
    def dim(self) -> int:
        return self.cfg.nfilt

    @property
    def steps_per_second(self) -> float:
        return 1.0 / self.cfg.winstep

    def raw(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """[T, nfilt] float32 log filter-bank energies before CMVN (natural log)."""
        from python_speech_features import fbank

        def compute(y: np.ndarray) -> np.ndarray:
            energies, _ = fbank(y, samplerate=sample_rate, winlen=self.cfg.winlen, winstep=self.cfg.winstep,
                                nfilt=self.cfg.nfilt, nfft=self.cfg.nfft, preemph=0.0, winfunc=np.hanning)
            return np.log(energies)  # fbank floors zero energies at machine epsilon

        return framewise(samples, sample_rate, self.cfg, self.dim, compute, self.block_s)

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """[S] float32 mono samples at ``sample_rate`` Hz -> [T, nfilt] float32, CMVN-normalised."""
        return cmvn(self.raw(samples, sample_rate))
