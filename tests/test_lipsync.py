"""The lip-sync proxy: ridge fit, the shipped coefficients, and a known offset found in a
synthetic clip (a mouth that opens with a beeping tone)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gstalk.metrics.lipsync import ASSET, Clip, LipSyncProxy, audio_context_features, fit_proxy, ridge, zscore

SR, FPS = 16000, 25.0


def beeps(n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 120-400 ms tone bursts: (audio [S], per-frame envelope [N] in {0, 1})."""
    rng = np.random.default_rng(seed)
    env = np.zeros(n_frames)
    i = 2
    while i < n_frames - 12:
        on = int(rng.integers(3, 10))
        env[i:i + on] = 1
        i += on + int(rng.integers(3, 12))
    t = np.arange(int(n_frames / FPS * SR)) / SR
    gate = np.repeat(env, SR / FPS)[: len(t)]
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) * gate + 0.003 * rng.standard_normal(len(t))
    return audio.astype(np.float32), env


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5))
    w_true = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    w, b = ridge(x, x @ w_true + 0.7, alpha=1e-6)
    np.testing.assert_allclose(w, w_true, atol=1e-6)
    assert b == pytest.approx(0.7, abs=1e-6)


def test_features_shape_and_context():
    audio, _ = beeps(50, 0)
    f = audio_context_features(audio, SR, 50, FPS)
    assert f.shape == (50, 13 * 26) and np.isfinite(f).all()
    # frame i's context block j is frame (i + j - 6)'s own block, clamped at the ends
    own = f[:, 6 * 26:7 * 26]
    np.testing.assert_allclose(f[10, 7 * 26:8 * 26], own[11])
    np.testing.assert_allclose(f[0, 0:26], own[0])


@pytest.mark.parametrize("k", [-3, 2, 4])
def test_shipped_proxy_finds_a_known_offset_in_a_beeping_clip(k):
    audio, env = beeps(250, 1)
    proxy = LipSyncProxy.load()
    # fitted on speech, the proxy predicts the mouth opening about one frame (40 ms) before
    # the sound (lips lead the voice), so a beep-driven mouth in sync reads as lag +1; the
    # lag found must move frame for frame with the shift
    base = proxy.score(env, audio, SR, FPS)
    assert base["sync_lag"] in (0, 1) and base["sync_corr_best"] > 0.5
    mouth = np.roll(env, -k)  # the audio is k frames late: mouth[i] goes with audio[i + k]
    s = proxy.score(mouth, audio, SR, FPS)
    assert s["sync_lag"] - base["sync_lag"] == k and s["sync_corr_best"] > 0.5
    mismatched = proxy.score(beeps(250, 2)[1], audio, SR, FPS)
    assert mismatched["sync_corr"] < 0.3 and mismatched["sync_corr_best"] < s["sync_corr_best"]


def test_fit_proxy_on_synthetic_clips_generalises_to_a_held_out_clip(tmp_path):
    clips = []
    for seed in range(4):
        audio, env = beeps(150, 10 + seed)
        clips.append(Clip(f"c{seed}", audio_context_features(audio, SR, 150, FPS), zscore(env)))
    proxy = fit_proxy(clips)
    assert proxy.info["held_out_mean_corr"] > 0.6
    assert all(v["best_lag"] == 0 for v in proxy.info["clips"].values())
    proxy.save(tmp_path / "p.json")
    again = LipSyncProxy.load(tmp_path / "p.json")
    np.testing.assert_allclose(again.weights, proxy.weights)
    assert json.loads((tmp_path / "p.json").read_text())["bands"] == 26


def test_shipped_coefficients_parse():
    d = json.loads(ASSET.read_text())
    assert len(d["weights"]) == (2 * d["context"] + 1) * d["bands"] and d["info"]["held_out_mean_corr"] > 0.3
