"""Audio features: window alignment, frame counts, MFCC layout."""

from __future__ import annotations

import numpy as np

from gstalk.audio import MFCCExtractor, frame_windows, n_video_frames, normalise
from gstalk.config import AudioFeatureConfig


def test_frame_windows_are_centred_on_each_frame():
    steps = np.arange(100, dtype=np.float32)[:, None]  # step k has value k, 50 steps/s
    w = frame_windows(steps, n_frames=25, fps=25, steps_per_second=50, window=16)
    assert w.shape == (25, 16, 1)
    # frame 10 is at t = 0.4 s = step 20; window = steps 12..27
    assert w[10, :, 0].tolist() == list(range(12, 28))
    # frame 0: steps -8..-1 are outside the audio -> zeros
    assert w[0, :8, 0].tolist() == [0.0] * 8 and w[0, 8:, 0].tolist() == list(range(0, 8))


def test_frame_windows_offset_pairs_frame_with_later_audio():
    steps = np.arange(200, dtype=np.float32)[:, None]
    a = frame_windows(steps, 50, 25, 50, 16, offset_frames=5)
    b = frame_windows(steps, 60, 25, 50, 16)
    np.testing.assert_array_equal(a[10], b[15])


def test_n_video_frames_rounds_duration():
    assert n_video_frames(16000 * 3, 16000, 25) == 75
    assert n_video_frames(int(16000 * 1.019), 16000, 25) == 25  # 25.475 frames -> 25
    assert n_video_frames(int(16000 * 1.021), 16000, 25) == 26


def test_mfcc_rate_and_dim():
    cfg = AudioFeatureConfig()
    ex = MFCCExtractor(cfg)
    sig = np.sin(2 * np.pi * 200 * np.arange(16000 * 2) / 16000).astype(np.float32)
    f = ex(sig, 16000)
    assert f.shape[1] == cfg.numcep == ex.dim
    assert abs(f.shape[0] - 2 * ex.steps_per_second) <= 2
    assert np.isfinite(f).all()
    silence = ex(np.zeros(16000, np.float32), 16000)
    assert np.isfinite(silence).all()


def test_normalise_uses_given_statistics():
    x = np.array([[1.0, 10.0], [3.0, 30.0]], np.float32)
    n = normalise(x, x.mean(0), x.std(0))
    np.testing.assert_allclose(n, [[-1, -1], [1, 1]], atol=1e-6)
