"""Extract and track on the real sample clip (skipped when ../shared/data is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from gstalk.workspace import Workspace


@pytest.fixture(scope="module")
def obama_ws(shared_data, tmp_path_factory):
    from gstalk.config import get_preset
    from gstalk.stages.extract import run_extract
    from gstalk.stages.track import run_track

    p = get_preset("test")  # 128 px: the same code paths, a quarter of the pixels
    root = tmp_path_factory.mktemp("real") / "obama_ws"
    run_extract(shared_data / "video" / "obama.mp4", root, p.extract, preset="test")
    run_track(str(root), p.track)
    return Workspace.open(root)


@pytest.fixture(scope="module")
def aoc_ws(shared_data, tmp_path_factory):
    from gstalk.config import get_preset
    from gstalk.stages.extract import run_extract
    from gstalk.stages.track import run_track

    p = get_preset("test")
    root = tmp_path_factory.mktemp("real") / "aoc_ws"
    run_extract(shared_data / "video" / "aoc_hdtf.mp4", root, p.extract, preset="test")
    run_track(str(root), p.track)
    return Workspace.open(root)


def test_extract_on_real_clip(obama_ws):
    s = obama_ws.stage("extract").summary
    assert s["n_frames"] == 500 and s["fps"] == 25.0 and s["size"] == 128
    assert s["split"] == {"train": [0, 455], "test": [455, 500]}  # the last 1/11, as the peers
    assert s["audio"]["duration_s"] == pytest.approx(20.0, abs=0.05)
    assert 100 < s["face"]["face_size_src_px"] < 300  # the face is ~240 px tall in the 450 px source


def test_track_on_real_clip(obama_ws):
    from gstalk.tensorio import load_tensors

    s = obama_ws.stage("track").summary
    assert s["interpolated_frames"] == 0 and s["multi_face_frames"] == 0
    assert s["reprojection_error_px"] < 1.5  # at 128 px
    assert 1.5 * 128 < s["focal_px"] < 4.0 * 128
    assert s["jitter_rot_deg"] < s["jitter_rot_deg_raw"]
    # the data notes: the audio is about 5 frames (0.2 s) behind the lips
    assert 4 <= s["av_offset_frames"] <= 7 and s["av_correlation"] > 0.25
    t, meta = load_tensors(obama_ws.path("track", "tracks.safetensors"))
    assert len(meta["blendshape_names"]) == 52 and "jawOpen" in meta["blendshape_names"]
    blink = t["blink"].numpy()
    assert blink.max() == 1.0 and np.median(blink) < 0.5  # eyes are open most of the time


def test_lipsync_proxy_scores_real_audio_high_and_shuffled_audio_low(obama_ws):
    """obama.mp4 is not in the proxy's fit (the GRID sentences): its own audio scores about 0.5
    at its A/V offset (~+5 frames), the same audio in shuffled 1 s blocks about 0."""
    import soundfile as sf

    from gstalk.dataset import load_tracks
    from gstalk.metrics.lipsync import LipSyncProxy
    from gstalk.tracking.avsync import mouth_opening

    proxy = LipSyncProxy.load()
    assert "obama" not in " ".join(proxy.info["clips"])
    samples, sr = sf.read(str(obama_ws.path("extract", "audio.wav")), dtype="float32")
    opening = mouth_opening(load_tracks(obama_ws).landmarks.numpy())
    real = proxy.score(opening, samples, sr, 25.0)
    assert real["sync_corr_best"] > 0.3 and 4 <= real["sync_lag"] <= 8
    blocks = np.array_split(np.arange(len(samples)), 20)
    order = np.random.default_rng(0).permutation(20)
    shuffled = proxy.score(opening, np.concatenate([samples[blocks[i]] for i in order]), sr, 25.0)
    assert abs(shuffled["sync_corr"]) < 0.15 and shuffled["sync_corr_best"] < real["sync_corr_best"] - 0.2


def test_the_proxy_reads_a_clip_it_was_not_fitted_on_at_its_offset(aoc_ws):
    """The proxy is fitted on GRID alone, so both clips issue 18 is measured on are held out
    of it. Fitted on aoc_hdtf as well (the proxy before), it read that clip in sample: 0.64
    at lag 0, its audio's +3-frame delay learnt into the weights. Held out, the clip reads
    at the offset the track stage finds for it, at a correlation like other real clips'."""
    import soundfile as sf

    from gstalk.dataset import load_tracks
    from gstalk.metrics.lipsync import LipSyncProxy
    from gstalk.tracking.avsync import mouth_opening

    proxy = LipSyncProxy.load()
    assert all(name.startswith("grid_") for name in proxy.info["clips"])
    samples, sr = sf.read(str(aoc_ws.path("extract", "audio.wav")), dtype="float32")
    opening = mouth_opening(load_tracks(aoc_ws).landmarks.numpy())
    real = proxy.score(opening, samples, sr, 25.0)
    offset = aoc_ws.stage("track").summary["av_offset_frames"]
    assert 2 <= real["sync_lag"] <= 4 and abs(real["sync_lag"] - offset) <= 1
    assert 0.25 < real["sync_corr_best"] < 0.55 and real["sync_corr"] < real["sync_corr_best"] - 0.1
