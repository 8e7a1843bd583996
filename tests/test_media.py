"""Media I/O: probing, decoding with resampling, encoding with muxed audio."""

from __future__ import annotations

import numpy as np
import pytest

from gstalk.errors import InputError
from gstalk.media import VideoWriter, probe, read_audio, read_video_frames, write_wav


@pytest.fixture
def tone_wav(tmp_path):
    sr = 16000
    t = np.arange(int(sr * 1.3)) / sr
    p = tmp_path / "tone.wav"
    write_wav(p, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)
    return p


def _write_video(path, n, size=64, fps=25.0, audio=None):
    with VideoWriter(path, size, size, fps, audio_path=audio) as w:
        for i in range(n):
            w.write(np.full((size, size, 3), (i * 7) % 256, np.uint8))


def test_writer_frame_count_and_muxed_audio(tmp_path, tone_wav):
    out = tmp_path / "v.mp4"
    _write_video(out, 33, audio=tone_wav)
    info = probe(out)
    assert info.video.n_frames == 33
    assert info.video.fps == pytest.approx(25.0)
    assert info.audio is not None and info.audio.duration_s == pytest.approx(1.3, abs=0.05)


def test_decode_resamples_frame_rate(tmp_path):
    out = tmp_path / "v50.mp4"
    _write_video(out, 50, fps=50.0)  # 1 s at 50 fps
    frames = list(read_video_frames(out, fps=25.0, size=32, src_size=(64, 64)))
    assert len(frames) == 25
    assert frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8 and frames[0].flags.c_contiguous


def test_read_audio_resamples_and_mixes_to_mono(tmp_path):
    import soundfile as sf

    sr = 44100
    t = np.arange(sr) / sr
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t)], 1) * 0.5
    p = tmp_path / "s.wav"
    sf.write(p, stereo, sr)
    a = read_audio(p, 16000)
    assert a.dtype == np.float32 and abs(len(a) - 16000) <= 2
    assert 0.45 < np.abs(a).max() < 0.55


def test_probe_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        probe(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        probe(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 20)
    with pytest.raises(InputError, match="not a media file"):
        probe(tmp_path / "text.mp4")


def test_no_audio_track(tmp_path):
    out = tmp_path / "silent.mp4"
    _write_video(out, 5)
    assert probe(out).audio is None
    with pytest.raises(InputError, match="no audio track"):
        read_audio(out)


def test_odd_names_are_safe(tmp_path, tone_wav):
    out = tmp_path / "-v 'quoted' ünïcode.mp4"
    _write_video(out, 5, audio=tone_wav)
    assert probe(out).video.n_frames == 5
    assert len(read_audio(out)) > 0
