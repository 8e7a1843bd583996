"""One live session on its own worker thread: client audio in, timed frames out.

The web handler (:mod:`gstalk.serve.app`) hands the client's PCM to :meth:`Session.feed` and
sends whatever the session emits; the worker decodes, resamples to the avatar's rate (soxr),
and drives a :class:`~gstalk.serve.live.LiveStream`.

**The frame clock.** Frame ``i`` is due at ``t0 + margin + i / fps``. A frame is rendered and
sent as soon as its audio (look-ahead included) has arrived, usually well before it is due.
When a frame's audio has not arrived by the time it must be rendered, silence is appended to
the timeline (plus ``jitter_s``, so that late audio that follows does not underrun again): the
avatar idles (training poses back and forth, their blinks) and never freezes; audio that
arrives later is played after that silence. At the start the timeline gets ``lookahead +
jitter_s`` of silence, so the first (idle) frame goes out at once. A frame that is more than
``max_late_s`` late (the machine is slower than real time) is skipped, its audio still sent, so
the stream keeps real time instead of slowing down.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gstalk.serve import protocol
from gstalk.serve.live import LiveAvatar, LiveFrame, LiveStream

_ids = itertools.count(1)


@dataclass(frozen=True)
class Limits:
    """Per-session limits (``gstalk serve`` flags).

    Attributes:
        max_session_s: longest session, s (``--max-session``).
        idle_timeout_s: a session whose client sends nothing (no audio, no ping) this long is
            closed (``--idle-timeout``; 0: never).
        max_ahead_s: audio a client may send ahead of real time, s (``--max-ahead``): more is a
            client sending faster than real time, and the session is closed.
        max_pending_s: frames waiting to be sent, in seconds of video: more means the client
            is not reading them, and the session is closed.
    """

    max_session_s: float = 600.0
    idle_timeout_s: float = 60.0
    max_ahead_s: float = 3.0
    max_pending_s: float = 3.0


@dataclass
class Closing:
    """Why a session ends: a WebSocket close code, a reason, and the ``error`` message's
    code (None for a normal end)."""

    code: int
    reason: str
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MiB (Linux /proc; 0 elsewhere)."""
    cur = peak = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024.0
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return cur, peak


class Session:
    """A live session (see the module docstring).

    Args:
        live: the warm avatar.
        emit: called on the worker thread with each outgoing message (bytes: a frame, str:
            JSON); must not block.
        finish: called once (on the worker thread) when the worker ends on its own (a bad
            input, a bug), with the :class:`Closing`.
        in_rate: the client's sample rate, Hz. channels: 1 or 2 (mixed to mono).
        limits: :class:`Limits`.
        jitter_s: how late client audio may arrive before silence is inserted, s.
        max_late_s: a frame this late is skipped.
        jpeg_quality: 1-100.
        process_s: the expected time to render one frame (the start-up measurement), s.
        clock: a monotonic clock (tests).
    """

    def __init__(self, live: LiveAvatar, emit: Callable[[bytes | str], None],
                 finish: Callable[[Closing], None], *, in_rate: int, channels: int = 1,
                 limits: Limits = Limits(), jitter_s: float = 0.12, max_late_s: float = 0.15,
                 jpeg_quality: int = 85, process_s: float = 0.04, clock: Callable[[], float] = time.monotonic):
        self.id = f"s{next(_ids)}"
        self.live, self.emit, self._finish = live, emit, finish
        self.in_rate, self.channels, self.limits = int(in_rate), int(channels), limits
        self.jitter_s, self.max_late_s, self.jpeg_quality = jitter_s, max_late_s, jpeg_quality
        self.process_s = max(0.0, process_s)
        self.margin_s = self.process_s + 0.02
        self.clock = clock
        self.lookahead_s = live.lookahead.total_s
        self.fps, self.sr = live.fps, live.sample_rate
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._carry = b""
        self._checked = 0  # client samples looked at by the format check
        self._loud = 0
        self._client_out = 0  # client samples (at the avatar's rate) appended so far
        self._resampler: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self.t0 = clock()
        self.frames = self.skipped = self.silence_inserted = 0
        self.written_s = 0.0
        self.received_s = 0.0
        self.stream: LiveStream | None = None

    # ------------------------------------------------------------------ the web side's calls
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"gstalk-session-{self.id}", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        """Client PCM bytes (any size); decoded on the worker thread."""
        with self._lock:
            self._queued_bytes += len(data)
        self.received_s += len(data) / (2 * self.channels * self.in_rate)
        self._q.put(("pcm", data))

    def end_of_speech(self) -> None:
        """The client's ``{"type": "end"}``: render the last words now."""
        self._q.put(("end", None))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (it finishes the frame it renders) and wait for it."""
        self._stop.set()
        self._q.put(("stop", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ahead_s(self) -> float:
        """Client audio received ahead of the frame clock, s: about ``jitter_s`` for a client
        that sends in real time, growing for one that sends faster."""
        with self._lock:
            queued = self._queued_bytes / (2 * self.channels * self.in_rate)
        consumed = (self.clock() - self.t0 - self.margin_s) + self.lookahead_s
        return self.written_s + queued - consumed

    def stats(self) -> dict[str, Any]:
        rss, peak = _rss_mb()
        return {"type": "stats", "session": self.id, "frames": self.frames, "skipped": self.skipped,
                "silence_inserted_s": round(self.silence_inserted / self.sr, 3),
                "received_s": round(self.received_s, 3), "ahead_s": round(self.ahead_s(), 3),
                "uptime_s": round(self.clock() - self.t0, 3), "rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1)}

    def ready_message(self) -> dict[str, Any]:
        """The ``ready`` message: what the client needs to play the stream."""
        return {"type": "ready", "session": self.id, "avatar": self.live.name, "fps": self.fps,
                "width": self.live.width, "height": self.live.height, "frame_format": "jpeg",
                "sample_rate": self.sr, "audio_format": "s16le", "channels": 1,
                "lookahead_s": round(self.lookahead_s, 4), "lookahead": self.live.lookahead.as_dict(),
                "jitter_s": self.jitter_s,
                "input": {"sample_rate": self.in_rate, "channels": self.channels, "format": "s16le"},
                "limits": {"max_session_s": self.limits.max_session_s, "idle_timeout_s": self.limits.idle_timeout_s,
                           "max_ahead_s": self.limits.max_ahead_s}}

    # ------------------------------------------------------------------ the worker
    def _due(self, i: int) -> float:
        return self.t0 + self.margin_s + i / self.fps

    def _fail(self, closing: Closing) -> None:
        if not self._finished:
            self._finished = True
            self._stop.set()
            self._finish(closing)

    def _run(self) -> None:
        try:
            self.stream = LiveStream(self.live)
            self._append(np.zeros(int(round((self.lookahead_s + self.jitter_s) * self.sr)), np.float32), None)
            self._send(self.stream.render_next(), 0.0)  # the first (idle) frame, at once
            self.t0 = self.clock() - self.margin_s  # the frame clock starts with it
            next_stats = self.t0 + 2.0
            while not self._stop.is_set():
                # frames whose audio has arrived first (they are due soonest), then the queued
                # audio: a backlog of client audio (at start-up, or after a stall) does not hold
                # up frames that are ready
                if self._render_ready():
                    continue
                self._drain()
                if self._stop.is_set():
                    break
                if self.stream.ready():
                    continue
                now = self.clock()
                if now >= next_stats:
                    self.emit(_json(self.stats()))
                    next_stats = now + 2.0
                wait = self._due(self.stream.next_index) - self.process_s - now
                if wait > 0:
                    try:
                        item = self._q.get(timeout=min(wait, max(0.0, next_stats - now) + 1e-3))
                    except queue.Empty:
                        continue
                    self._handle(item)
                    continue
                # no audio for the next frame in time: idle on silence, plus the jitter allowance
                need = self.stream.next_index / self.fps + self.lookahead_s + self.jitter_s - self.written_s
                n = max(int(round(need * self.sr)), int(round(self.sr / self.fps)))
                self.silence_inserted += n
                self._append(np.zeros(n, np.float32), None)
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server keeps serving
            import traceback

            traceback.print_exc()
            self._fail(Closing(protocol.CLOSE_ERROR, protocol.close_reason(f"internal error: {exc}"), "internal",
                               {"detail": f"{type(exc).__name__}: {exc}"}))
        finally:
            if self.stream is not None:
                self.stream.close()

    def _append(self, samples: np.ndarray, client_s: float | None) -> None:
        assert self.stream is not None
        self.stream.push(samples, client_s)
        self.written_s = self.stream.written_s

    def _drain(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            self._handle(item)
            if self._stop.is_set():
                return

    def _handle(self, item: tuple[str, Any]) -> None:
        kind, data = item
        if kind == "stop":
            self._stop.set()
        elif kind == "pcm":
            with self._lock:
                self._queued_bytes -= len(data)
            self._pcm(data)
        elif kind == "end":
            self._flush_resampler()
            assert self.stream is not None  # the last words' look-ahead: silence, now
            need = self.lookahead_s + 1.0 / self.fps
            self.silence_inserted += int(round(need * self.sr))
            self._append(np.zeros(int(round(need * self.sr)), np.float32), None)

    def _pcm(self, data: bytes) -> None:
        if self._checked == 0 and not self._carry and data[:4] == b"RIFF" and b"WAVE" in data[:16]:
            self._fail(Closing(protocol.CLOSE_UNSUPPORTED, "a WAV file, not raw PCM: strip its header and send "
                               "the 16-bit samples", "bad_format"))
            return
        data = self._carry + data
        size = 2 * self.channels
        usable = len(data) - len(data) % size
        self._carry = data[usable:]
        if usable == 0:
            return
        x = np.frombuffer(data[:usable], "<i2").reshape(-1, self.channels)
        if self._checked < self.in_rate // 2:  # the first 0.5 s: is it really 16-bit PCM?
            part = x[: self.in_rate // 2 - self._checked]
            self._loud += int((np.abs(part.astype(np.int32)) >= 12000).sum())
            self._checked += len(part)
            if self._checked >= min(4000, self.in_rate // 2) and self._loud > 0.25 * self._checked * self.channels:
                self._fail(Closing(protocol.CLOSE_UNSUPPORTED, "not 16-bit PCM: most samples are near full scale "
                                   "(float32 sent as s16le?)", "bad_format"))
                return
        mono = x.astype(np.float32).mean(axis=1) / 32768.0
        if self.in_rate != self.sr:
            if self._resampler is None:
                import soxr

                self._resampler = soxr.ResampleStream(self.in_rate, self.sr, 1, dtype="float32")
            mono = self._resampler.resample_chunk(mono)
        self._client(mono)

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self._resampler = None
            self._client(tail)

    def _client(self, mono: np.ndarray) -> None:
        if mono.size:
            self._append(mono, self._client_out / self.sr)
            self._client_out += mono.size

    def _render_ready(self) -> bool:
        assert self.stream is not None
        did = False
        while self.stream.ready() and not self._stop.is_set():
            i = self.stream.next_index
            late = self.clock() - self._due(i)
            self._send(self.stream.skip_next() if late > self.max_late_s else self.stream.render_next(), late)
            did = True
        return did

    def _send(self, f: LiveFrame, late: float) -> None:
        import cv2

        jpeg = b""
        if f.image is None:
            self.skipped += 1
        else:
            ok, buf = cv2.imencode(".jpg", f.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            jpeg = buf.tobytes() if ok else b""
            self.frames += 1
        pcm = (np.clip(f.audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        header = {"type": "frame", "i": f.index, "pts": round(f.pts, 6),
                  "input_s": None if f.input_s is None else round(f.input_s, 6), "skipped": not jpeg,
                  "pose_frame": f.pose_frame, "late_s": round(late, 4)}
        self.emit(protocol.pack_frame(header, jpeg, pcm))


def _json(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj)


def frames_per_pending(limits: Limits, fps: float) -> int:
    """Messages that may wait to be sent before a client counts as not reading."""
    return max(8, int(math.ceil(limits.max_pending_s * fps)))
