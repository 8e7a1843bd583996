"""Speed perturbation for the articulation prior (gstalk.audio.perturb, prior.clip_from_workspace)."""

from __future__ import annotations

import numpy as np
import pytest

from gstalk.audio.perturb import resample_frames, shift_audio, speed_perturb, speed_ratio


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1.0 / sr)[np.argmax(spec)])


@pytest.mark.parametrize("speed", [0.9, 1.1, 0.8])
def test_speed_perturbation_scales_duration_and_frequency(speed):
    sr = 16000
    t = np.arange(2 * sr) / sr
    x = (0.5 * np.sin(2 * np.pi * 200.0 * t)).astype(np.float32)
    y = speed_perturb(x, speed)
    assert y.dtype == np.float32
    assert abs(len(y) - len(x) / speed) <= 1
    # 2 s of signal: FFT bins of 0.5 Hz (0.55 after the change of length)
    assert _peak_hz(y, sr) == pytest.approx(200.0 * speed, abs=0.6)
    assert np.abs(y).max() == pytest.approx(0.5, abs=0.02)  # the level is kept
    np.testing.assert_array_equal(speed_perturb(x, 1.0), x)


def test_speed_ratio_is_a_small_fraction_and_checked():
    assert (speed_ratio(0.9).numerator, speed_ratio(0.9).denominator) == (10, 9)
    assert (speed_ratio(1.1).numerator, speed_ratio(1.1).denominator) == (10, 11)
    for bad in (0.0, 0.3, 2.5, float("nan")):
        with pytest.raises(ValueError, match="out of range"):
            speed_ratio(bad)


def test_shift_audio_advances_or_delays_with_silence():
    x = np.zeros(100, np.float32)
    x[50] = 1.0
    ahead = shift_audio(x, 100, 0.1)  # 10 samples earlier
    assert np.argmax(ahead) == 40 and ahead.sum() == 1.0 and len(ahead) == 100
    late = shift_audio(x, 100, -0.2)
    assert np.argmax(late) == 70 and late[:20].sum() == 0.0
    assert shift_audio(x, 100, 2.0).sum() == 0.0  # shifted past either end: silence
    assert shift_audio(x, 100, -1.5).sum() == 0.0 and len(shift_audio(x, 100, -1.5)) == 100


def test_resample_frames_reads_the_original_clock():
    v = np.stack([np.arange(11.0), np.arange(11.0) ** 2], axis=1)  # [11, 2]
    out = resample_frames(v, 1.25)
    j = np.arange(9)  # floor(10 / 1.25) + 1
    assert out.shape == (9, 2)
    np.testing.assert_allclose(out[:, 0], j * 1.25)
    # the square is interpolated linearly between whole frames
    t = j * 1.25
    lo = np.floor(t)
    np.testing.assert_allclose(out[:, 1], lo ** 2 + (t - lo) * ((lo + 1) ** 2 - lo ** 2))
    assert resample_frames(v, 0.8).shape == (13, 2)  # floor(10 / 0.8) + 1


def _peak_lag(clip, max_lag: int = 4) -> float:
    """The lag (frames, parabolic sub-frame peak) at which the clip's lip opening follows
    the loudness of its feature windows (the centre step's mean filter-bank energy)."""
    from gstalk.tracking.avsync import correlate_lags

    w = clip.shifted_windows()
    loud = w[:, w.shape[1] // 2, :26].mean(1).astype(np.float64)
    curve = correlate_lags(clip.targets[:, 0].astype(np.float64), loud, max_lag)
    k = max(curve, key=lambda lag: curve[lag])
    a, b, c = curve[k - 1], curve[k], curve[k + 1]
    return k + 0.5 * (a - c) / (a - 2 * b + c)


@pytest.mark.slow
def test_perturbed_copies_of_a_clip_stay_in_sync(trained_ws):
    """The mannequin's audio is 2 frames late (its jaw follows the beep's loudness ~0.4 frame
    later still): the clip as recorded peaks at ~2.4 frames. A perturbed copy, put in sync
    first (offset 2), keeps only the sub-frame rest, on its own clock (rest / speed); without
    the offset it would peak ~2.4 / speed frames late. The copy spans the training split's
    time on its own clock."""
    from gstalk.prior import clip_from_workspace

    clip = clip_from_workspace(trained_ws, "fbank+phones")
    late = _peak_lag(clip)
    assert 2.0 <= late <= 3.0
    for speed in (0.8, 1.25):
        copy = clip_from_workspace(trained_ws, "fbank+phones", speed=speed, offset=2)
        assert copy.name == f"{trained_ws.name}@speed{speed:g}" and copy.speed == speed and copy.offset == 0
        assert len(copy.targets) == int(np.floor((len(clip.targets) - 1) / speed)) + 1
        assert copy.windows.shape[1:] == clip.windows.shape[1:]
        assert abs(_peak_lag(copy) - (late - 2) / speed) <= 0.35
        unshifted = clip_from_workspace(trained_ws, "fbank+phones", speed=speed)
        assert abs(_peak_lag(unshifted) - late / speed) <= 0.45


@pytest.mark.parametrize("bad,says", [("3", "out of range"), ("0", "out of range"), ("fast", "not a number")])
def test_prior_fit_refuses_a_bad_speed_before_reading_anything(bad, says, tmp_path, capsys):
    from gstalk.prior import main

    with pytest.raises(SystemExit) as e:
        main(["fit", str(tmp_path / "no_such_ws"), "--speed", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--speed" in err and says in err
