"""The audio front ends: CMVN filter-banks, PocketSphinx phones, combinations, and the
articulation prior shipped with gstalk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gstalk.audio import get_extractor
from gstalk.audio.fbank import FbankExtractor, cmvn
from gstalk.audio.features import CombinedExtractor, n_steps, training_statistics
from gstalk.audio.phones import (
    PHONES,
    VISEME_NAMES,
    VISEMES,
    PhoneExtractor,
    decode_segments,
    frames_to_steps,
    segments_to_frames,
)
from gstalk.config import AudioFeatureConfig
from gstalk.errors import InputError, UsageError

CFG = AudioFeatureConfig()


def speechlike(seconds: float = 3.0, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-rate-modulated signal with noise: no digital silence anywhere."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 12))
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    return (0.2 * env * voice + 0.05 * rng.normal(size=t.size)).astype(np.float32)


def test_cmvn_matches_a_hand_computation():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    # band 0: mean 3, std sqrt(8/3); band 1 is constant: std floored at 1e-3, so it stays 0
    expected = np.stack([(x[:, 0] - 3.0) / np.sqrt(8.0 / 3.0), np.zeros(3)], 1)
    np.testing.assert_allclose(cmvn(x), expected, rtol=1e-6)
    np.testing.assert_allclose(cmvn(x, mean=np.array([1.0, 5.0]), std=np.array([2.0, 1.0])),
                               [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert cmvn(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("gain_db", [-20.0, 20.0])
def test_fbank_cmvn_is_invariant_to_gain(gain_db):
    """A gain g adds log g² to every log filter-bank energy; CMVN takes the mean away. The
    raw energies shift by exactly that (up to the tiny dither), the normalised ones not at all."""
    ex = FbankExtractor(CFG)
    x = speechlike()
    g = 10 ** (gain_db / 20)
    raw, raw_g = ex.raw(x, 16000), ex.raw(x * g, 16000)
    # tolerance: the fixed dither (std 1e-5) is ~0.6 % of the quietest band's energy at -20 dB
    np.testing.assert_allclose(raw_g - raw, np.full_like(raw, 2 * np.log(g)), atol=1e-2)
    np.testing.assert_allclose(ex(x * g, 16000), ex(x, 16000), atol=1e-2)
    # MFCC normalised with the *training* clip's statistics (gstalk's old front end) is not
    mfcc = get_extractor("mfcc", CFG)
    a = mfcc(x, 16000)
    mean, std = training_statistics(mfcc, a)
    shifted = (mfcc(x * g, 16000) - mean) / std
    assert np.abs(shifted[:, 0] - (a[:, 0] - mean[0]) / std[0]).mean() > 1.0  # energy coefficient moved


def test_fbank_layout_and_rate():
    ex = get_extractor("fbank", CFG)
    f = ex(speechlike(2.0), 16000)
    assert f.shape == (n_steps(32000, 16000, CFG), CFG.nfilt) and ex.dim == CFG.nfilt
    assert ex.steps_per_second == 50.0 and ex.normalisation == "utterance"
    np.testing.assert_allclose(f.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(f.std(0), 1.0, atol=1e-3)


def test_segments_become_posteriors_per_step():
    # 10-ms frames: SIL 0-9, P 10-19, AA 20-39 -> 20-ms steps (two frames each)
    segs = [("SIL", 0, 9), ("P", 10, 19), ("AA", 20, 39)]
    frames = segments_to_frames(segs, 40, "visemes")
    assert frames.shape == (40, len(VISEME_NAMES)) and (frames.sum(1) == 1).all()
    closed, open_ = VISEME_NAMES.index("closed"), VISEME_NAMES.index("open_vowel")
    assert frames[15, closed] == 1 and frames[25, open_] == 1
    steps = frames_to_steps(frames, 20, 50.0, blur=0)
    assert steps.shape == (20, len(VISEME_NAMES))
    assert steps[5:10, closed].tolist() == [1.0] * 5 and steps[10:, open_].tolist() == [1.0] * 10
    blurred = frames_to_steps(frames, 20, 50.0, blur=1)  # weights 1/4, 1/2, 1/4 across a boundary
    np.testing.assert_allclose(blurred.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(blurred[9:11, closed], [0.75, 0.25], atol=1e-6)
    phones = segments_to_frames([("ZZZ", 0, 4)], 10, "phones")  # an unknown label counts as speech
    assert phones.shape == (10, len(PHONES)) and phones[0, PHONES.index("+SPN+")] == 1
    assert phones[7, PHONES.index("SIL")] == 1  # not covered: silence
    assert sorted(p for ps in VISEMES.values() for p in ps) == sorted(PHONES)  # every phone has a viseme


def test_phone_extractor_shapes_and_rate():
    ex = get_extractor("phones", CFG)
    assert isinstance(ex, PhoneExtractor) and ex.dim == 12 and ex.normalisation == "none"
    x = speechlike(2.0)
    f = ex(x, 16000)
    assert f.shape == (n_steps(x.size, 16000, CFG), 12)
    np.testing.assert_allclose(f.sum(1), 1.0, atol=1e-5)
    assert ex(np.zeros(0, np.float32), 16000).shape == (0, 12)
    full = PhoneExtractor(dataclasses.replace(CFG, phone_units="phones"))
    assert full(x, 16000).shape == (f.shape[0], len(PHONES))
    with pytest.raises(ValueError, match="16000 Hz"):
        decode_segments(x, 8000)


def test_combined_front_end_concatenates_and_normalises_only_mfcc():
    ex = get_extractor("fbank+phones", CFG)
    assert isinstance(ex, CombinedExtractor) and ex.name == "fbank+phones" and ex.dim == CFG.nfilt + 12
    x = speechlike(2.0)
    f = ex(x, 16000)
    assert f.shape == (n_steps(x.size, 16000, CFG), ex.dim)
    mixed = get_extractor("mfcc+phones", CFG)
    steps = mixed(x, 16000)
    mean, std = training_statistics(mixed, steps)
    np.testing.assert_allclose(mean[:13], steps[:, :13].mean(0), rtol=1e-5)
    assert (mean[13:] == 0).all() and (std[13:] == 1).all()  # phone posteriors are left as they are
    for bad in ("banana", "fbank+fbank", "fbank+"):
        with pytest.raises(UsageError, match="Unknown audio features"):
            get_extractor(bad, CFG)


def test_grid_clip_decodes_to_its_words_phones(shared_data):
    """GRID's aligned clip says 'set white with p two soon'; every word's stretch of the
    decoded phones shares a phone with the word's pronunciation (CMU dictionary, shipped in
    the pocketsphinx wheel), and the phone error rate is below 60 %."""
    from gstalk.audio.phones import model_paths
    from gstalk.media import read_audio

    lexicon = {}
    with open(model_paths()["dict"], encoding="utf-8") as f:
        for line in f:
            w, *ph = line.split()
            lexicon.setdefault(w, [p.rstrip("012") for p in ph])
    x = read_audio(shared_data / "grid" / "id2_vcd_swwp2s.mpg", 16000)
    segs = decode_segments(x, 16000)
    words = []
    for line in (shared_data / "grid" / "swwp2s.align").read_text().split("\n"):
        if line.strip() and line.split()[2] != "sil":
            a, b, w = line.split()
            words.append((int(a) / 250.0, int(b) / 250.0, w))  # 1/25000 s -> 10-ms frames
    for a, b, w in words:
        heard = {p for p, s, e in segs if s < b and e >= a}
        assert heard & set(lexicon[w]), f"'{w}' ({lexicon[w]}) decoded as {sorted(heard)}"
    expected = [p for _, _, w in words for p in lexicon[w]]
    decoded = [p for p, _, _ in segs if p not in ("SIL", "+NSN+", "+SPN+")]
    d = np.arange(len(decoded) + 1)  # edit distance
    for i, p in enumerate(expected, 1):
        prev, d[0] = d.copy(), i
        for j, q in enumerate(decoded, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (p != q))
    assert d[-1] / len(expected) < 0.6, (expected, decoded)


def test_shipped_prior_loads_without_network_and_predicts():
    from gstalk.deform.articulation import ARTICULATION_NAMES
    from gstalk.prior import ASSET, ArticulationPrior

    prior = ArticulationPrior.load()
    assert prior.path == ASSET and prior.features == AudioFeatureConfig().features
    m = prior.meta
    assert m["names"] == list(ARTICULATION_NAMES) and m["frames"] > 5000 and m["speakers"] >= 14
    assert all(len(c["sha256"]) == 64 for c in m["clips"])  # provenance of every clip
    # the offsets are measured against the GRID sentences (recorded in sync), not the corpus's average
    assert m["synchronous"] and all(n.startswith("grid_") for n in m["synchronous"])
    assert all(m["offsets"][n]["offset"] == 0 for n in m["synchronous"])
    ex = get_extractor(prior.features, CFG)
    assert m["dim"] == ex.dim and m["window"] == CFG.window
    with torch.no_grad():
        codes = prior.ensemble.predict_sequence(torch.zeros(30, CFG.window, ex.dim))
    assert codes.shape == (30, len(ARTICULATION_NAMES)) and torch.isfinite(codes).all()
    assert prior.compatible(prior.features, dataclasses.asdict(CFG), CFG.window, ARTICULATION_NAMES) is None
    assert "mfcc" in prior.compatible("mfcc", dataclasses.asdict(CFG), CFG.window, ARTICULATION_NAMES)


def test_prior_of_the_wrong_shape_is_refused_by_name(tmp_path):
    from gstalk.prior import ArticulationPrior
    from gstalk.tensorio import load_tensors, save_tensors

    tensors, meta = load_tensors(ArticulationPrior.load().path)
    key = next(k for k in tensors if k.endswith("conv.0.weight"))
    bad = dict(tensors)
    bad[key] = torch.zeros(3, 3, 3)
    save_tensors(tmp_path / "bad.safetensors", bad, meta)
    with pytest.raises(InputError, match=f"'{key}' has shape \\[3, 3, 3\\]"):
        ArticulationPrior.load(tmp_path / "bad.safetensors")
    missing = {k: v for k, v in tensors.items() if k != key}
    save_tensors(tmp_path / "missing.safetensors", missing, meta)
    with pytest.raises(InputError, match="lacks the tensor"):
        ArticulationPrior.load(tmp_path / "missing.safetensors")
    save_tensors(tmp_path / "foreign.safetensors", tensors, {"kind": "something else"})
    with pytest.raises(InputError, match="not a gstalk articulation prior"):
        ArticulationPrior.load(tmp_path / "foreign.safetensors")
    save_tensors(tmp_path / "newer.safetensors", tensors, {**meta, "schema": 99})
    with pytest.raises(InputError, match="schema 99"):
        ArticulationPrior.load(tmp_path / "newer.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot be read"):
        ArticulationPrior.load(tmp_path / "junk.safetensors")


def test_resolve_prior_explains_itself(tmp_path):
    from gstalk.prior import resolve_prior

    audio = dataclasses.asdict(CFG)
    prior, note = resolve_prior("auto", CFG.features, audio, CFG.window)
    assert prior is not None and "shipped" in note
    prior, note = resolve_prior("auto", "mfcc", audio, CFG.window)
    assert prior is None and "--audio-features" in note
    prior, note = resolve_prior("none", CFG.features, audio, CFG.window)
    assert prior is None and "none" in note
    with pytest.raises(UsageError, match="does not fit this workspace"):
        resolve_prior(str(__import__("gstalk.prior").prior.ASSET), "mfcc", audio, CFG.window)


def _stream(ex, x, mean, std, chunks, **kw):  # type: ignore[no-untyped-def]
    from gstalk.audio.stream import FeatureStream

    fs = FeatureStream(ex, 16000, mean, std, **kw)
    out, pos = [], 0
    for k in chunks:
        out.append(fs.push(x[pos:pos + k]))
        pos += k
    out.append(fs.push(x[pos:]))
    out.append(fs.flush())
    return np.concatenate(out), fs


def test_streamed_mfcc_equals_the_whole_file():
    """Chunks of any size give exactly the whole-file steps (same framing, dither, pre-emphasis)."""
    ex = get_extractor("mfcc", CFG)
    x = speechlike(2.5)
    batch = ex(x, 16000)
    mean, std = training_statistics(ex, batch)
    chunks = np.random.default_rng(3).integers(1, 2500, 30)
    streamed, _ = _stream(ex, x, mean, std, chunks)
    np.testing.assert_allclose(streamed, (batch - mean) / std, atol=1e-4)


def test_streamed_fbank_converges_to_utterance_cmvn():
    """The running CMVN starts from the prior statistics and converges to the utterance's."""
    ex = get_extractor("fbank", CFG)
    x = np.concatenate([speechlike(3.0, seed=1), speechlike(3.0, seed=2)])
    batch = ex(x, 16000)
    raw = ex.raw(x, 16000)
    mean, std = training_statistics(ex, batch)  # 0 / 1: fbank normalises itself
    streamed, fs = _stream(ex, x, mean, std, [800] * 100, cmvn_prior=(raw.mean(0), raw.std(0)))
    assert streamed.shape == batch.shape
    np.testing.assert_allclose(streamed[-50:], batch[-50:], atol=0.15)
    cold, _ = _stream(ex, x, mean, std, [800] * 100)  # no prior: worse at the start
    assert np.abs(cold[:25] - batch[:25]).mean() > np.abs(streamed[:25] - batch[:25]).mean()
    assert fs.latency_s == pytest.approx(CFG.winlen)


def test_streamed_phones_agree_with_the_whole_file(shared_data):
    from gstalk.media import read_audio

    ex = get_extractor("phones", CFG)
    x = read_audio(shared_data / "audio" / "en_radio40.wav", 16000)
    batch = ex(x, 16000)
    streamed, fs = _stream(ex, x, np.zeros(12), np.ones(12), [1600] * 40)  # 100-ms chunks
    assert streamed.shape == batch.shape
    # live decoding normalises the cepstra with running statistics (PocketSphinx's live CMN), so
    # some phones differ from the whole-file decoding: 80-92 % of the steps agree on these voices
    agree = (streamed.argmax(1) == batch.argmax(1)).mean()
    assert agree > 0.75, agree
    assert np.abs(streamed - batch).mean() < 0.05
    assert fs.latency_s > 0.3  # the phone latency is part of the look-ahead
