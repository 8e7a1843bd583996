"""Audio features of a live stream, step by step, for live serving.

:class:`FeatureStream` takes audio in chunks of any size and returns the feature steps that
are final so far, so a server can turn speech into frames while it arrives. It runs the same
front ends as whole files (:func:`gstalk.audio.get_extractor`), with two differences that
a live stream forces:

- **Framing** is the same (``winlen`` windows every ``winstep``, the same dither sequence and
  pre-emphasis), so the raw filter-bank / MFCC steps equal the whole-file ones exactly.
- **Per-utterance CMVN** (``fbank``) cannot wait for the end of the utterance: it uses running
  statistics over the steps so far, started from ``cmvn_prior`` (the training clip's raw
  statistics, weighted as ``prior_steps`` steps), so the normalisation converges to the
  speaker's own within a few seconds.
- **Phones** (``phones``) are decoded live by PocketSphinx; a phone is final once the decoder
  is ``phone_latency_s`` past its end (later audio rarely changes it). The utterance is
  restarted every ``phone_block_s`` seconds to keep memory bounded, as whole files are.

Look-ahead: a step is returned once it is final; :attr:`FeatureStream.latency_s` says how
much audio after a step that needs (one window for MFCC/fbank, plus the phone latency).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gstalk.audio.features import CombinedExtractor, MFCCExtractor, n_steps
from gstalk.config import AudioFeatureConfig


class _FramedStream:
    """Raw MFCC or log filter-bank steps of a stream, equal to the whole-file ones."""

    def __init__(self, part: Any, sample_rate: int):
        self.part, self.sr = part, sample_rate
        cfg: AudioFeatureConfig = part.cfg
        self.flen = int(math.floor(cfg.winlen * sample_rate + 0.5))
        self.hop = int(math.floor(cfg.winstep * sample_rate + 0.5))
        self.rng = np.random.default_rng(0)  # the same dither sequence as gstalk.audio.features.framewise
        self.buf = np.zeros(0)  # pre-emphasised samples from sample index ``start``
        self.start = 0
        self.last = 0.0  # the previous dithered sample (pre-emphasis across chunks)
        self.n = 0  # samples received
        self.done = 0  # steps returned

    def _compute(self, y: np.ndarray) -> np.ndarray:
        from python_speech_features import fbank, mfcc

        c = self.part.cfg
        if isinstance(self.part, MFCCExtractor):
            return mfcc(y, samplerate=self.sr, winlen=c.winlen, winstep=c.winstep, numcep=c.numcep, nfilt=c.nfilt,
                        nfft=c.nfft, appendEnergy=True, winfunc=np.hanning, preemph=0.0)
        energies, _ = fbank(y, samplerate=self.sr, winlen=c.winlen, winstep=c.winstep, nfilt=c.nfilt, nfft=c.nfft,
                            preemph=0.0, winfunc=np.hanning)
        return np.log(energies)

    def push(self, samples: np.ndarray) -> np.ndarray:
        x = np.asarray(samples, np.float64) + self.rng.normal(0.0, 1e-5, len(samples))
        y = x.copy()
        if len(x):
            y[1:] -= 0.97 * x[:-1]
            y[0] -= 0.97 * self.last if self.n > 0 else 0.0
            self.last = float(x[-1])
        self.buf = np.concatenate([self.buf, y])
        self.n += len(samples)
        ready = 0 if self.n < self.flen else 1 + (self.n - self.flen) // self.hop  # complete windows
        return self._emit(ready, pad=False)

    def flush(self) -> np.ndarray:
        return self._emit(n_steps(self.n, self.sr, self.part.cfg), pad=True)

    def _emit(self, upto: int, pad: bool) -> np.ndarray:
        m = upto - self.done
        if m <= 0:
            return np.zeros((0, self.part.dim), np.float32)
        a = self.done * self.hop - self.start
        b = a + (m - 1) * self.hop + self.flen
        seg = self.buf[a:b]
        if pad and len(seg) < b - a:  # the last windows, zero-padded as python_speech_features does
            seg = np.concatenate([seg, np.zeros(b - a - len(seg))])
        out = self._compute(seg)[:m].astype(np.float32)
        self.done = upto
        keep = self.done * self.hop - self.start
        self.buf, self.start = self.buf[keep:], self.start + keep
        return out


class _RunningCMVN:
    """Mean/variance normalisation with statistics over the steps so far, started from a prior."""

    def __init__(self, dim: int, prior_mean: np.ndarray | None, prior_std: np.ndarray | None, prior_steps: float):
        from gstalk.audio.fbank import CMVN_FLOOR

        self.floor = CMVN_FLOOR
        self.count = float(prior_steps) if prior_mean is not None else 0.0
        self.mean = np.zeros(dim) if prior_mean is None else np.asarray(prior_mean, np.float64).copy()
        var = np.ones(dim) if prior_std is None else np.asarray(prior_std, np.float64) ** 2
        self.m2 = var * self.count

    def __call__(self, steps: np.ndarray) -> np.ndarray:
        out = np.empty(steps.shape, np.float32)
        for i, x in enumerate(np.asarray(steps, np.float64)):
            self.count += 1.0
            d = x - self.mean
            self.mean += d / self.count
            self.m2 += d * (x - self.mean)
            std = np.sqrt(self.m2 / self.count) if self.count > 1 else np.ones_like(x)
            out[i] = (x - self.mean) / np.maximum(std, self.floor)
        return out


class _PhoneStream:
    """Live PocketSphinx all-phone decoding to posteriors per step (as :class:`~gstalk.audio.phones.PhoneExtractor`)."""

    def __init__(self, part: Any, sample_rate: int, latency_s: float, block_s: float):
        from gstalk.audio.phones import DECODER_HZ, new_decoder

        if sample_rate != 16000:
            raise ValueError(f"PocketSphinx's en-us model needs 16000 Hz audio, got {sample_rate} Hz")
        self.part, self.sr = part, sample_rate
        self.dec = new_decoder(part.cfg.phone_lw)
        self.per = DECODER_HZ / part.steps_per_second  # decoder frames per step
        self.hz = DECODER_HZ
        self.latency = int(round(latency_s * DECODER_HZ))
        self.block = int(round(block_s * sample_rate))
        self.frames = np.zeros((0, part.dim), np.float32)  # one-hot per final decoder frame from ``frames_start``
        self.frames_start = 0
        self.final = 0  # decoder frames final so far (absolute)
        self.utt_start = 0  # absolute decoder frame where the current utterance began
        self.utt_samples = 0
        self.n = 0  # samples received
        self.done = 0  # steps returned
        self.dec.start_utt()

    def _segments(self) -> list[tuple[str, int, int]]:
        return [(str(s.word), self.utt_start + int(s.start_frame), self.utt_start + int(s.end_frame))
                for s in (self.dec.seg() or ())]

    def _finalise(self, upto: int) -> None:
        from gstalk.audio.phones import segments_to_frames

        if upto <= self.final:
            return
        local = [(p, a - self.final, b - self.final) for p, a, b in self._segments() if b >= self.final and a < upto]
        self.frames = np.concatenate([self.frames, segments_to_frames(local, upto - self.final, self.part.units)])
        self.final = upto

    def push(self, samples: np.ndarray) -> None:
        from gstalk.audio.phones import to_pcm16

        pos = 0
        while pos < len(samples):
            take = min(len(samples) - pos, self.block - self.utt_samples)
            self.dec.process_raw(to_pcm16(samples[pos:pos + take]), full_utt=False)
            pos += take
            self.utt_samples += take
            self.n += take
            if self.utt_samples >= self.block:  # restart the utterance: memory stays bounded
                self.dec.end_utt()
                end = self.utt_start + int(round(self.utt_samples / self.sr * self.hz))
                self._finalise(end)
                self.dec.start_utt()
                self.utt_start, self.utt_samples = end, 0
        self._finalise(self.utt_start + int(self.utt_samples / self.sr * self.hz) - self.latency)

    def flush(self) -> None:
        self.dec.end_utt()
        self._finalise(int(math.ceil(self.n / self.sr * self.hz)))

    def steps(self, upto: int, final: bool = False) -> np.ndarray:
        """Posterior steps ``done .. upto - 1`` that the final frames determine (all of them
        at the end of the stream, ``final``), equal to the whole-file steps when the
        decoding is the same."""
        from gstalk.audio.phones import frames_to_steps

        blur = self.part.cfg.phone_blur
        if not final:  # a step's blur reaches ``blur`` steps ahead, whose frames must be final
            upto = min(upto, int(self.final / self.per) - blur)
        if upto <= self.done:
            return np.zeros((0, self.part.dim), np.float32)
        lo = max(0, self.done - blur)
        hi = upto if final else upto + blur  # at the end, the last step is repeated as whole files do
        a = int(round(lo * self.per)) - self.frames_start
        block = frames_to_steps(self.frames[a:], hi - lo, self.part.steps_per_second, blur)
        out = block[self.done - lo:upto - lo]
        self.done = upto
        drop = int(round(max(0, self.done - blur) * self.per)) - self.frames_start  # keep memory flat
        if drop > 0:
            self.frames, self.frames_start = self.frames[drop:], self.frames_start + drop
        return out


class FeatureStream:
    """Feature steps of a live audio stream, normalised as the workspace's training features.

    Args:
        extractor: the workspace's front end (:func:`gstalk.audio.get_extractor`).
        sample_rate: Hz of the pushed samples (the workspace's audio rate).
        mean, std: [C] the training statistics :func:`gstalk.audio.normalise` applies
            (``extract/audio_features.safetensors``).
        cmvn_prior: (mean [c], std [c]) raw statistics that start the running CMVN of the
            ``fbank`` part (None: zero / one, converging from the first steps).
        prior_steps: weight of ``cmvn_prior``, in steps (250 = 5 s at 50 steps/s).
        phone_latency_s: how far the decoder must be past a phone before it is final.
        phone_block_s: the decoder's utterance length (memory bound).

    Use :meth:`push` with chunks of [S] float32 mono samples, then :meth:`flush` at the end;
    each returns the new final steps [t, C] float32, in order. Concatenated, they have the
    whole-file length (:func:`gstalk.audio.features.n_steps`).
    """

    def __init__(self, extractor: Any, sample_rate: int, mean: np.ndarray, std: np.ndarray, *,
                 cmvn_prior: tuple[np.ndarray, np.ndarray] | None = None, prior_steps: float = 250.0,
                 phone_latency_s: float = 0.3, phone_block_s: float = 30.0):
        parts = extractor.parts if isinstance(extractor, CombinedExtractor) else (extractor,)
        self.extractor, self.sr = extractor, sample_rate
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.parts: list[Any] = []
        c = 0
        for p in parts:
            if p.name == "phones":
                self.parts.append(("phones", _PhoneStream(p, sample_rate, phone_latency_s, phone_block_s), None))
            else:
                cmvn = None
                if p.normalisation == "utterance":
                    pm, ps = (cmvn_prior[0][c:c + p.dim], cmvn_prior[1][c:c + p.dim]) if cmvn_prior else (None, None)
                    cmvn = _RunningCMVN(p.dim, pm, ps, prior_steps)
                self.parts.append(("framed", _FramedStream(p, sample_rate), cmvn))
            c += p.dim
        self.pending = [np.zeros((0, p.dim), np.float32) for p in parts]
        self.new: list[np.ndarray | None] = [None] * len(parts)  # framed steps pushed, not yet collected
        self.phone_latency_s = phone_latency_s if any(k == "phones" for k, _, _ in self.parts) else 0.0
        self.steps_per_second = extractor.steps_per_second
        self.emitted = 0

    @property
    def latency_s(self) -> float:
        """Audio needed after a step's start before it is returned (s)."""
        cfg = self.extractor.parts[0].cfg if isinstance(self.extractor, CombinedExtractor) else self.extractor.cfg
        return cfg.winlen + self.phone_latency_s + (2 * cfg.phone_blur * cfg.winstep if self.phone_latency_s else 0.0)

    def _collect(self, final: bool) -> np.ndarray:
        framed_counts = []
        for k, (kind, s, cmvn) in enumerate(self.parts):
            if kind == "framed":
                new = s.flush() if final else self.new[k]
                self.new[k] = None
                if cmvn is not None and new is not None and len(new):
                    new = cmvn(new)
                if new is not None:
                    self.pending[k] = np.concatenate([self.pending[k], new])
                framed_counts.append(self.emitted + len(self.pending[k]))
        target = min(framed_counts) if framed_counts else None
        for k, (kind, s, _) in enumerate(self.parts):
            if kind == "phones":
                if final:
                    s.flush()
                    upto = n_steps(s.n, self.sr, s.part.cfg)
                else:
                    upto = target if target is not None else n_steps(s.n, self.sr, s.part.cfg)
                self.pending[k] = np.concatenate([self.pending[k], s.steps(upto, final)])
        ready = min(len(p) for p in self.pending)
        if ready == 0:
            return np.zeros((0, sum(p.shape[1] for p in self.pending)), np.float32)
        out = np.concatenate([p[:ready] for p in self.pending], axis=1)
        self.pending = [p[ready:] for p in self.pending]
        self.emitted += ready
        return ((out - self.mean) / np.maximum(self.std, 1e-6)).astype(np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Feed [S] float32 mono samples; returns the new final steps [t, C] float32."""
        x = np.asarray(samples, np.float32).reshape(-1)
        for k, (kind, s, _) in enumerate(self.parts):
            if kind == "framed":
                self.new[k] = s.push(x)
            else:
                s.push(x)
        return self._collect(final=False)

    def flush(self) -> np.ndarray:
        """End of the stream: the remaining steps [t, C] float32."""
        return self._collect(final=True)
