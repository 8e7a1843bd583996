"""Frame-level phonetic features from PocketSphinx's all-phone decoder.

PocketSphinx (``pocketsphinx`` on PyPI) ships a US-English acoustic model (``en-us``), trained
on many hours of many voices, and a phone bigram model (``en-us-phone.lm.bin``) inside its wheel,
so phone recognition needs no download. Its all-phone search decodes an utterance into a phone
sequence with 10-ms boundaries; its front end normalises the cepstra per utterance (batch CMN).
A phone is a speaker-independent description of what the mouth does, which is what a 20-s clip
of one voice cannot teach an audio → mouth regressor.

:class:`PhoneExtractor` turns the segments into per-step posteriors: a one-hot row per 10-ms
decoder frame, folded into lip-shape classes (visemes, :data:`VISEMES`) or kept as the 42 phones
(:data:`PHONES`), averaged over each feature step (``winstep``, 20 ms by default) and blurred by
a small triangular kernel, so a boundary the decoder puts one frame early or late changes the
features a little, not all at once. Non-English speech decodes to the nearest English phones
(measured in ``docs/methods.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from gstalk.audio.features import n_steps
from gstalk.config import AudioFeatureConfig

# CMU / PocketSphinx en-us phone set: 39 phones, silence, noise, and the speech-like garbage model
PHONES = ("SIL", "+NSN+", "+SPN+", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY",
          "F", "G", "HH", "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T",
          "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH")
# lip-shape classes (visemes): what the lips and jaw do for each phone
VISEMES: dict[str, tuple[str, ...]] = {
    "rest": ("SIL", "+NSN+", "+SPN+"),
    "closed": ("P", "B", "M"),  # bilabial: lips shut
    "lip_teeth": ("F", "V"),  # labiodental
    "tongue_teeth": ("TH", "DH"),
    "alveolar": ("T", "D", "N", "L"),
    "sibilant": ("S", "Z"),
    "rounded_consonant": ("SH", "ZH", "CH", "JH"),  # protruded lips
    "back": ("K", "G", "NG", "HH", "Y"),
    "glide": ("R", "W", "ER"),  # rounded approximants
    "open_vowel": ("AA", "AE", "AH", "AY", "AW"),  # jaw open
    "spread_vowel": ("EH", "EY", "IH", "IY"),  # lips spread
    "rounded_vowel": ("AO", "OW", "OY", "UH", "UW"),  # lips rounded
}
VISEME_NAMES = tuple(VISEMES)
_VISEME_OF = {p: i for i, (_, ps) in enumerate(VISEMES.items()) for p in ps}
DECODER_HZ = 100.0  # PocketSphinx frames per second (10-ms hop)
SAMPLE_RATE = 16000  # the shipped acoustic model's rate


def model_paths() -> dict[str, str]:
    """The acoustic model, dictionary and phone language model inside the ``pocketsphinx`` wheel.

    Raises:
        gstalk.errors.DependencyError: pocketsphinx is not installed.
    """
    try:
        import pocketsphinx
    except ImportError as exc:  # a dependency of gstalk: a broken install
        from gstalk.errors import DependencyError

        raise DependencyError("The 'phones' audio features need pocketsphinx, which is not installed.",
                              hint="pip install 'pocketsphinx==5.1.1' (a dependency of gstalk)") from exc
    root = os.path.join(pocketsphinx.get_model_path(), "en-us")
    return {"hmm": os.path.join(root, "en-us"), "allphone": os.path.join(root, "en-us-phone.lm.bin"),
            "dict": os.path.join(root, "cmudict-en-us.dict")}


def new_decoder(lw: float = 2.0):  # type: ignore[no-untyped-def]
    """A PocketSphinx all-phone decoder (``lw``: language-model weight; ~0.1 s to create)."""
    from pocketsphinx import Config, Decoder

    p = model_paths()
    return Decoder(Config(lm=None, hmm=p["hmm"], allphone=p["allphone"], dict=p["dict"], lw=lw, beam=1e-20,
                          pbeam=1e-20, loglevel="FATAL"))


def to_pcm16(samples: np.ndarray) -> bytes:
    """[S] float samples in [-1, 1] -> little-endian 16-bit PCM bytes (clipped)."""
    return (np.clip(np.asarray(samples, np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def decode_segments(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, lw: float = 2.0, block_s: float = 30.0,
                    decoder=None) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    """All-phone decoding of mono speech: [(phone, first frame, last frame)], frames of 10 ms
    from the start of ``samples``, inclusive, covering it without gaps.

    Long audio is decoded in utterances of ``block_s`` seconds (memory stays bounded).

    Raises:
        ValueError: ``sample_rate`` is not 16000 Hz (the acoustic model's rate).
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"PocketSphinx's en-us model needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    dec = decoder if decoder is not None else new_decoder(lw)
    out: list[tuple[str, int, int]] = []
    block = int(block_s * sample_rate)
    for a in range(0, max(int(samples.size), 1), block):
        seg = samples[a:a + block]
        if seg.size == 0:
            break
        base = int(round(a / sample_rate * DECODER_HZ))
        dec.start_utt()
        dec.process_raw(to_pcm16(seg), full_utt=True)
        dec.end_utt()
        for s in dec.seg() or ():  # None when nothing was decoded
            out.append((str(s.word), base + int(s.start_frame), base + int(s.end_frame)))
    return out


def segments_to_frames(segments: list[tuple[str, int, int]], n_frames: int, units: str = "visemes") -> np.ndarray:
    """One-hot class per 10-ms decoder frame: [n_frames, K] float32 (K = 12 visemes or 42
    phones); frames no segment covers are silence (``rest`` / ``SIL``); unknown labels count
    as ``+SPN+`` (speech-like)."""
    k = len(VISEME_NAMES) if units == "visemes" else len(PHONES)
    out = np.zeros((n_frames, k), np.float32)
    covered = np.zeros(n_frames, bool)
    for label, a, b in segments:
        a, b = max(0, a), min(n_frames - 1, b)
        if b < a:
            continue
        name = label if label in PHONES else "+SPN+"
        col = _VISEME_OF[name] if units == "visemes" else PHONES.index(name)
        out[a:b + 1, col] = 1.0
        covered[a:b + 1] = True
    out[~covered, 0] = 1.0  # rest / SIL are column 0 in both sets
    return out


def frames_to_steps(frames: np.ndarray, n_out: int, steps_per_second: float, blur: int = 1) -> np.ndarray:
    """Decoder frames [F, K] (100 Hz) -> feature steps [n_out, K] at ``steps_per_second``:
    step t averages the decoder frames inside [t/sps, (t+1)/sps) s (the step's hop, the same
    framing as the other front ends), then a triangular blur of half-width ``blur`` steps.
    Rows are posteriors (sum to 1)."""
    k = frames.shape[1]
    out = np.zeros((n_out, k), np.float32)
    if n_out == 0:
        return out
    per = DECODER_HZ / steps_per_second
    for t in range(n_out):
        a = int(round(t * per))
        b = max(a + 1, int(round((t + 1) * per)))
        seg = frames[a:min(b, len(frames))]
        if len(seg):
            out[t] = seg.mean(0)
        else:
            out[t, 0] = 1.0  # past the decoded audio: silence
    if blur > 0:
        w = np.concatenate([np.arange(1, blur + 2), np.arange(blur, 0, -1)]).astype(np.float32)
        w /= w.sum()
        pad = np.concatenate([np.repeat(out[:1], blur, 0), out, np.repeat(out[-1:], blur, 0)])
        out = np.stack([np.convolve(pad[:, j], w, mode="valid") for j in range(k)], 1).astype(np.float32)
    return out


@dataclass(frozen=True)
class PhoneExtractor:
    """Viseme (or phone) posteriors per feature step from PocketSphinx all-phone decoding.

    Args:
        cfg: the audio config (``winstep`` sets the step rate; ``phone_units``: ``visemes``
            (12 lip-shape classes, the default) or ``phones`` (42); ``phone_lw``: the phone
            language-model weight).

    Output: [T, K] float32 rows summing to 1, T = :func:`~gstalk.audio.features.n_steps`.
    """

    cfg: AudioFeatureConfig
    name: str = "phones"
    normalisation: str = "none"

    @property
    def units(self) -> str:
        return self.cfg.phone_units

    @property
    def dim(self) -> int:
        return len(VISEME_NAMES) if self.units == "visemes" else len(PHONES)

    @property
    def steps_per_second(self) -> float:
        return 1.0 / self.cfg.winstep

    def __call__(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """[S] float32 mono samples at 16 kHz -> [T, K] float32 posteriors.

        Raises:
            ValueError: ``sample_rate`` is not 16000 Hz.
        """
        t = n_steps(int(samples.size), sample_rate, self.cfg)
        if t == 0:
            return np.zeros((0, self.dim), np.float32)
        segs = decode_segments(samples, sample_rate, self.cfg.phone_lw)
        n_frames = int(np.ceil(samples.size / sample_rate * DECODER_HZ))
        frames = segments_to_frames(segs, n_frames, self.units)
        return frames_to_steps(frames, t, self.steps_per_second, self.cfg.phone_blur)
