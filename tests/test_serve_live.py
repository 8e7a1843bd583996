"""The live path of gstalk serve without the web: incremental windows and conditions equal the
whole-clip ones, live frames equal gstalk render's, the look-ahead, the session's frame clock,
the capacity rule and the wire format."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from gstalk.render.driver import loop_poses


def speechlike(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated signal with pauses (not speech, but it moves the features)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 8))
    env = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 0.5 * (np.sin(2 * np.pi * 0.4 * t) > -0.3)
    return (0.2 * voiced * env + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def live(trained_ws):  # type: ignore[no-untyped-def]
    from gstalk.serve.live import load_live_avatar

    return load_live_avatar(trained_ws)


def test_loop_pose_walks_the_frames_forwards_then_backwards():
    """The live stream's pose of frame i is render's ``--pose loop`` (one function), by hand."""
    from gstalk.render.driver import loop_pose

    assert loop_poses(9, range(3, 6)) == [3, 4, 5, 4, 3, 4, 5, 4, 3]
    assert loop_poses(5, [4, 9, 2]) == [4, 9, 2, 9, 4]
    assert loop_poses(4, range(0, 2)) == [0, 1, 0, 1]
    assert loop_poses(3, range(7, 8)) == [7, 7, 7]
    assert [loop_pose(i, range(3, 6)) for i in (0, 4, 1000, 1001)] == [3, 3, 3, 4]  # period 4: 1000 % 4 == 0


def test_frame_conditions_equal_whole_sequence(live):  # type: ignore[no-untyped-def]
    from gstalk.deform.audio import neighbour_indices

    model = live.avatar.model
    k = model.condition_context
    assert k > 1 and model.has_code_range  # the test preset's model has an articulator and its code range
    torch.manual_seed(0)
    n = 23
    windows = torch.randn(n, live.avatar.audio.window, live.extractor.dim)
    whole = model.conditions(windows, 1.3)
    rows = torch.stack([windows[neighbour_indices(i, k, n)[0]] for i in range(n)])
    one_by_one = torch.cat([model.frame_conditions(rows[i:i + 1], 1.3) for i in range(n)])
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="neighbour windows"):
        model.frame_conditions(windows[None], 1.0)


def test_live_frames_equal_render_frames(live, shared_data):  # type: ignore[no-untyped-def]
    """Driven by the whole-file feature steps in chunks of any size, the live stream renders
    exactly the frames gstalk render renders for the same audio (same poses, blinks, clamping
    at both ends)."""
    from gstalk.audio import normalise
    from gstalk.dataset import speech_windows
    from gstalk.media import read_audio
    from gstalk.serve.live import LiveStream

    a = live.avatar
    x = read_audio(shared_data / "audio" / "en_radio40.wav", 16000)[:int(1.9 * 16000)]
    windows = speech_windows(a.audio, x, 16000)
    ref = list(live.renderer.frames(windows, loop_poses(len(windows), a.train)))
    steps = normalise(live.extractor(x, 16000), a.audio.tensors["mean"], a.audio.tensors["std"])
    s = LiveStream(live)
    got, pos = [], 0
    rng = np.random.default_rng(1)
    try:
        while pos < len(steps):
            k = int(rng.integers(1, 9))
            s.push_steps(steps[pos:pos + k])
            pos += k
            while s.ready():
                got.append(s.render_next())
        s.end(len(x))
        while s.ready():
            got.append(s.render_next())
    finally:
        s.close()
    assert len(got) == len(ref) == 48
    assert [f.index for f in got] == list(range(48))
    assert [f.pose_frame for f in got] == loop_poses(48, a.train)
    for f, r in zip(got, ref):
        assert f.image is not None
        assert np.abs(f.image.astype(int) - r.astype(int)).max() <= 1  # float rounding of a batch of 1 vs many
    assert sum(int((f.image != r).any()) for f, r in zip(got, ref)) <= 2


def test_lookahead_is_what_the_stream_needs(live):  # type: ignore[no-untyped-def]
    """Each frame becomes ready once about the reported look-ahead of audio past its time has
    arrived, never later (20-ms chunks)."""
    from gstalk.serve.live import LiveStream

    la = live.lookahead
    assert la.window_s == pytest.approx(7 * 0.02)  # 16 steps of 20 ms: 7 after the centre step
    assert la.articulation_frames == live.avatar.model.condition_context - live.avatar.model.condition_context // 2 - 1
    assert la.total_s == pytest.approx(la.window_s + la.features_s + (la.articulation_frames
                                                                        + la.smoothing_frames) / 25.0)
    x = speechlike(4.0)
    s = LiveStream(live)
    ready_at: dict[int, float] = {}
    try:
        for pos in range(0, len(x), 320):
            s.push(x[pos:pos + 320], pos / 16000)
            while s.ready():
                f = s.render_next()
                ready_at[f.index] = s.written_s
    finally:
        s.close()
    waits = np.array([ready_at[i] - i / 25.0 for i in sorted(ready_at) if i >= 10])
    assert waits.max() <= la.total_s + 0.02 + 1e-6, (waits.max(), la.total_s)
    assert np.median(waits) >= la.total_s - 0.1, (np.median(waits), la.total_s)


def test_live_audio_and_input_positions(live):  # type: ignore[no-untyped-def]
    """Each frame carries its 40 ms of the timeline (silence included) and the position in the
    client's audio that it shows."""
    from gstalk.serve.live import LiveStream

    x = speechlike(2.0, seed=3)
    s = LiveStream(live)
    frames = []
    try:
        s.push_silence(0.5)
        for pos in range(0, len(x), 1000):
            s.push(x[pos:pos + 1000], pos / 16000)
        s.end()
        while s.ready():
            frames.append(s.skip_next())  # skipping renders nothing but keeps the audio
    finally:
        s.close()
    assert len(frames) == round(2.5 * 25) == 62  # round(duration * fps) frames, as gstalk render
    audio = np.concatenate([f.audio for f in frames])
    assert len(audio) == 62 * 640
    np.testing.assert_array_equal(audio[:8000], 0)
    np.testing.assert_array_equal(audio[8000:], x[:len(audio) - 8000])
    assert all(f.input_s is None for f in frames[:13]) and frames[13].input_s == pytest.approx(13 / 25 - 0.5)
    assert frames[40].input_s == pytest.approx(40 / 25 - 0.5)
    assert all(f.image is None for f in frames)


def test_capacity_rule():
    from gstalk.serve.capacity import Capacity

    cap = Capacity({"a": 2, "b": 1})
    assert cap.sessions_alone("a") == 2 and cap.sessions_alone("b") == 1
    t1 = cap.acquire("a")
    t2 = cap.acquire("a")
    assert t1 and t2 and cap.acquire("a") is None and cap.acquire("b") is None
    cap.release(t1)
    assert cap.acquire("b") is None  # 1/2 + 1/1 > 1
    t3 = cap.acquire("a", "render")
    assert t3 is not None and cap.active("live") == 1 and cap.active("render") == 1
    slow = Capacity({"a": 0})
    assert slow.sessions_alone("a") == 0 and slow.acquire("a") is None
    render = slow.acquire("a", "render")  # uploads still render, one at a time
    assert render is not None and slow.acquire("a", "render") is None
    forced = Capacity({"a": 0}, override=3)
    assert forced.sessions_alone("a") == 3
    assert [forced.acquire("a") is not None for _ in range(4)] == [True, True, True, False]


def test_a_newcomer_waits_for_a_closing_session_not_for_a_busy_one():
    """The slot of a session that is closing (its render thread stopping) goes to a newcomer
    that arrives meanwhile: it waits for the release instead of being refused; with the same
    session still live, or with no room even once it is gone, the refusal is immediate."""
    import asyncio

    pytest.importorskip("starlette", reason="gstalk serve needs the serve extra: pip install -e '.[serve]'")
    from gstalk.serve.app import _acquire
    from gstalk.serve.capacity import Capacity

    async def scenario(cap: Capacity, release_after_s: float | None, ticket) -> tuple[object, float]:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        if release_after_s is not None:
            loop.call_later(release_after_s, cap.release, ticket)
        t0 = time.monotonic()
        got = await _acquire(cap, "a", "live", wait_s=3.0)
        return got, time.monotonic() - t0

    cap = Capacity({"a": 1})
    held = cap.acquire("a")
    assert held is not None and not cap.fits_once_closed("a")
    got, waited = asyncio.run(scenario(cap, 0.3, held))  # live, not closing: refused at once
    assert got is None and waited < 0.1 and cap.active() == 1
    cap.mark_closing(held)
    assert cap.fits_once_closed("a") and cap.fits_once_closed("a", "render")
    got, waited = asyncio.run(scenario(cap, 0.3, held))
    assert got is not None and 0.25 < waited < 2.0 and cap.active() == 1

    two = Capacity({"a": 2, "b": 1})  # b needs the whole machine: one closing a of two live ones is not enough
    t1, t2 = two.acquire("a"), two.acquire("a")
    two.mark_closing(t1)
    assert not two.fits_once_closed("b") and two.fits_once_closed("a")
    two.mark_closing(t2)
    assert two.fits_once_closed("b")


def test_measured_capacity_keeps_each_stream_real_time(live):  # type: ignore[no-untyped-def]
    """The measurement's last admitted count kept every stream at 25 / 0.9 frames/s; the next
    one (if measured) did not."""
    from gstalk.serve.live import measure_capacity

    m = measure_capacity(live, frames=12, max_sessions=2)
    runs = m["runs"]
    assert runs[0]["streams"] == 1 and m["fps"] == runs[0]["fps"] > 0
    for r in runs[:m["sessions"]]:
        assert r["fps"] >= 25 / 0.9
    if m["sessions"] < len(runs):
        assert runs[m["sessions"]]["fps"] < 25 / 0.9


def test_frame_message_roundtrip():
    from gstalk.serve.protocol import close_reason, pack_frame, unpack_frame

    msg = pack_frame({"type": "frame", "i": 7, "pts": 0.28, "input_s": None}, b"\xff\xd8jpeg", b"\x01\x02" * 640)
    h, jpeg, pcm = unpack_frame(msg)
    assert h["i"] == 7 and h["jpeg_bytes"] == 6 and h["audio_bytes"] == 1280 and h["input_s"] is None
    assert jpeg == b"\xff\xd8jpeg" and pcm == b"\x01\x02" * 640
    with pytest.raises(ValueError):
        unpack_frame(msg[:-1])
    assert len(close_reason("é" * 200).encode()) <= 123


class _Collector:
    def __init__(self) -> None:
        self.frames: list[tuple[float, dict, int]] = []
        self.texts: list[dict] = []
        self.closing = None
        self.done = threading.Event()

    def emit(self, msg) -> None:  # type: ignore[no-untyped-def]
        from gstalk.serve.protocol import unpack_frame

        if isinstance(msg, str):
            self.texts.append(json.loads(msg))
        else:
            h, jpeg, _ = unpack_frame(msg)
            self.frames.append((time.monotonic(), h, len(jpeg)))

    def finish(self, closing) -> None:  # type: ignore[no-untyped-def]
        self.closing = closing
        self.done.set()


def test_session_idles_in_real_time_then_shows_the_speech(live):  # type: ignore[no-untyped-def]
    """No audio: idle frames at 25 frames/s from the start (never frozen); audio then sent in
    real time is shown about the look-ahead later, in order, none skipped."""
    from gstalk.serve.session import Session

    c = _Collector()
    s = Session(live, c.emit, c.finish, in_rate=16000, process_s=0.02)
    s.start()
    try:
        t_wait = time.monotonic()
        while not c.frames and time.monotonic() - t_wait < 10:
            time.sleep(0.005)
        first = c.frames[0][0]
        time.sleep(1.0)
        idle = [f for f in c.frames if f[0] < first + 1.0]
        x = (speechlike(1.5) * 32767).astype("<i2")
        t0 = time.monotonic()
        for k, pos in enumerate(range(0, len(x), 320)):
            time.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))
            s.feed(x[pos:pos + 320].tobytes())
        time.sleep(live.lookahead.total_s + 0.5)
    finally:
        s.stop()
    assert c.closing is None
    assert all(h["input_s"] is None for _, h, _ in idle)
    idx = [h["i"] for _, h, _ in c.frames]
    assert idx == list(range(len(idx)))
    speech = [(t, h) for t, h, _ in c.frames if h["input_s"] is not None]
    inputs = [h["input_s"] for _, h in speech]
    assert inputs == sorted(inputs)
    if os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):  # other programs hold the CPU: a stream that
        assert len(speech) >= 10  # falls behind skips frames by design; the timing is not this stream's
        return
    assert 20 <= len(idle) <= 32, len(idle)  # ~1 s of idle frames, not a burst and not frozen
    assert not any(h["skipped"] for _, h, _ in c.frames)
    assert len(speech) >= 30
    lat = [t - (t0 + h["input_s"]) for t, h in speech]
    assert np.median(lat) < live.lookahead.total_s + 0.3, np.median(lat)


def test_session_refuses_float32_and_wav(live):  # type: ignore[no-untyped-def]
    from gstalk.serve.protocol import CLOSE_UNSUPPORTED
    from gstalk.serve.session import Session

    for data, why in ((speechlike(0.6).tobytes(), "not 16-bit PCM"), (b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\0" * 64,
                                                                       "WAV file")):
        c = _Collector()
        s = Session(live, c.emit, c.finish, in_rate=16000)
        s.start()
        try:
            s.feed(data)
            assert c.done.wait(5)
        finally:
            s.stop()
        assert c.closing.code == CLOSE_UNSUPPORTED and why in c.closing.reason
