"""The web app of ``gstalk serve`` (Starlette): the page, the HTTP API and the live WebSocket.

Routes (``docs/serve.md`` has the details and examples):

- ``GET /``: the page (``static/index.html``: pick an avatar, upload a file or speak live).
- ``GET /v1/avatars``: the loaded avatars (name, size, fps, model, audio features, look-ahead,
  sessions that fit).
- ``GET /v1/status``: sessions, capacity, memory of the server process.
- ``POST /v1/render?avatar=NAME``: the request body is an audio file; the answer is the mp4
  ``gstalk render AVATAR --audio FILE -o OUT.mp4`` writes (the same bytes).
- ``WS /v1/live?avatar=NAME&sample_rate=HZ&channels=1``: a live session
  (:mod:`gstalk.serve.protocol`, :mod:`gstalk.serve.session`).

With a token, every request carries it: ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``
(the WebSocket and the page use the query string, as browsers cannot set headers there).
Errors are JSON: ``{"error": {"code", "message", "hint"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gstalk import __version__
from gstalk.serve import protocol
from gstalk.serve.capacity import Capacity, Ticket
from gstalk.serve.live import LiveAvatar
from gstalk.serve.session import Closing, Limits, Session, _rss_mb, frames_per_pending

RETRY_AFTER_S = 15
# how long a newcomer waits for closing sessions to free the slot it needs (a closing session
# stops its render thread within Session.stop's 5 s timeout, usually within one frame)
CLOSING_WAIT_S = 5.0


async def _acquire(capacity: Capacity, avatar: str, kind: str, wait_s: float = CLOSING_WAIT_S) -> Ticket | None:
    """:meth:`Capacity.acquire`, waiting up to ``wait_s`` seconds (polled every 20 ms) while the
    slot would be free once the sessions that are closing have released theirs. None: no room,
    and none is coming (the caller refuses with a retry hint)."""
    deadline = time.monotonic() + wait_s
    while (ticket := capacity.acquire(avatar, kind)) is None:
        if time.monotonic() >= deadline or not capacity.fits_once_closed(avatar, kind):
            return None
        await asyncio.sleep(0.02)
    return ticket


@dataclass
class ServerState:
    """Everything the routes share: the warm avatars, the capacity, the limits, the token.

    Attributes:
        avatars: name -> warm avatar.
        capacity: the admission control.
        limits: per-session limits.
        max_upload_bytes: largest ``POST /v1/render`` body.
        token: required on every request when not None.
        process_s: name -> measured seconds per frame (the session's frame clock margin).
        jpeg_quality: of the live frames.
        scratch: where uploads and renders are written while they are made (never a workspace).
    """

    avatars: dict[str, LiveAvatar]
    capacity: Capacity
    limits: Limits = field(default_factory=Limits)
    max_upload_bytes: int = 50 * 1024 * 1024
    token: str | None = None
    process_s: dict[str, float] = field(default_factory=dict)
    jpeg_quality: int = 85
    scratch: Path | None = None
    started: float = field(default_factory=time.monotonic)
    sessions: dict[str, Any] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    shutting_down: threading.Event = field(default_factory=threading.Event)
    # live sessions whose WebSocket close has not been sent yet (a session leaves ``sessions``
    # when it ends, before its close goes out)
    closing: set[str] = field(default_factory=set)

    def shutdown(self) -> None:
        """Close every live session with 1001 (callable from any thread, e.g. a signal handler)."""
        self.shutting_down.set()
        for handle in list(self.sessions.values()):
            handle.request_close(Closing(protocol.CLOSE_GOING_AWAY, "server shutting down", "shutdown"))


def _error(status: int, code: str, message: str, hint: str | None = None,
           headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """``{"error": {"code", "message", "hint"?, **extra}}`` with ``status``."""
    body: dict[str, Any] = {"code": code, "message": message}
    if hint:
        body["hint"] = hint
    body.update(extra)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _try_later(code: str, message: str) -> JSONResponse:
    """503: the ``Retry-After`` header and ``retry_after_s`` in the body (as the WebSocket's
    1013 refusal has), both :data:`RETRY_AFTER_S` seconds."""
    return _error(503, code, message, f"retry in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)},
                  retry_after_s=RETRY_AFTER_S)


def _token_ok(state: ServerState, conn: Request | WebSocket) -> bool:
    if state.token is None:
        return True
    given = conn.query_params.get("token")
    auth = conn.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), state.token.encode())


def _pick_avatar(state: ServerState, name: str | None) -> tuple[LiveAvatar | None, str]:
    if name is None:
        if len(state.avatars) == 1:
            return next(iter(state.avatars.values())), ""
        return None, f"name the avatar: ?avatar= one of {', '.join(state.avatars)}"
    if name not in state.avatars:
        return None, f"unknown avatar '{name}': this server has {', '.join(state.avatars)}"
    return state.avatars[name], ""


def create_app(state: ServerState) -> Starlette:
    """The Starlette app serving ``state``'s avatars."""

    async def page(request: Request) -> Response:
        if not _token_ok(state, request):
            return _error(401, "token", "token missing or wrong",
                          "open the URL gstalk serve printed (it carries ?token=...)")
        from importlib.resources import files

        html = (files("gstalk.serve") / "static" / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def avatars(request: Request) -> Response:
        if not _token_ok(state, request):
            return _error(401, "token", "token missing or wrong", "send Authorization: Bearer TOKEN or ?token=TOKEN")
        out = []
        for name, live in state.avatars.items():
            s = live.summary()
            s["sessions"] = state.capacity.sessions_alone(name)
            out.append(s)
        return JSONResponse({"avatars": out})

    async def status(request: Request) -> Response:
        if not _token_ok(state, request):
            return _error(401, "token", "token missing or wrong", "send Authorization: Bearer TOKEN or ?token=TOKEN")
        import resource

        rss, peak = _rss_mb()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return JSONResponse({"version": __version__, "uptime_s": round(time.monotonic() - state.started, 3),
                             "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
                             "sessions": [h.session.stats() for h in list(state.sessions.values())
                                          if h.session is not None],
                             "capacity": state.capacity.summary(), "rss_mb": round(rss, 1),
                             "peak_rss_mb": round(peak, 1), "shutting_down": state.shutting_down.is_set()})

    async def render(request: Request) -> Response:
        if not _token_ok(state, request):
            return _error(401, "token", "token missing or wrong", "send Authorization: Bearer TOKEN or ?token=TOKEN")
        if state.shutting_down.is_set():
            return _try_later("shutdown", "the server is shutting down")
        q = request.query_params
        live, why = _pick_avatar(state, q.get("avatar"))
        if live is None:
            return _error(404 if q.get("avatar") else 400, "avatar", why)
        pose, blink = q.get("pose", "loop"), q.get("blink", "video")
        if pose not in ("loop", "still"):
            return _error(400, "option", f"pose '{pose}' is not served", "use pose=loop or pose=still")
        if blink not in ("video", "auto"):
            return _error(400, "option", f"blink '{blink}' is unknown", "use blink=video or blink=auto")
        gain: float | None = None
        if "articulation_gain" in q:
            try:
                gain = float(q["articulation_gain"])
            except ValueError:
                return _error(400, "option", f"articulation_gain '{q['articulation_gain']}' is not a number")
        limit = state.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(413, "too_large", f"the upload is {int(length) / 2**20:.1f} MiB, the limit is "
                          f"{limit / 2**20:.1f} MiB", "send a shorter file, or start the server with a larger "
                          "--max-upload")
        tmp = Path(tempfile.mkdtemp(prefix="gstalk-serve-", dir=state.scratch))
        try:
            name = Path(q.get("filename", "speech")).name or "speech"
            audio = tmp / name
            size = 0
            with open(audio, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return _error(413, "too_large", f"the upload is over the limit of {limit / 2**20:.1f} MiB",
                                      "send a shorter file, or start the server with a larger --max-upload")
                    f.write(chunk)
            if size == 0:
                return _error(400, "empty", "the request body is empty: send the audio file as the body",
                              "curl --data-binary @speech.wav URL")
            # refuse what is not audio before taking a render slot (a bad upload gets its 422 even when
            # the server is busy)
            from starlette.concurrency import run_in_threadpool

            why = await run_in_threadpool(_not_audio, audio)
            if why is not None:
                return _error(422, "bad_audio", why, "send a speech file that ffmpeg reads (WAV, MP3, FLAC, M4A, ...)")
            ticket = await _acquire(state.capacity, live.name, "render")
            if ticket is None:
                return _try_later("capacity", f"the server is at capacity ({state.capacity.active()} sessions or "
                                  "renders)")
            try:
                out = tmp / "out.mp4"
                summary = await run_in_threadpool(_render_file, state, live, audio, out, pose, blink, gain)
            finally:
                state.capacity.release(ticket)
            data = out.read_bytes()
            return Response(data, media_type="video/mp4",
                            headers={"X-Gstalk-Frames": str(summary["frames"]),
                                     "X-Gstalk-Duration": f"{summary['duration_s']:.3f}",
                                     "Content-Disposition": f'inline; filename="{Path(name).stem}.mp4"'})
        except _Refused as exc:
            return _error(exc.status, exc.code, exc.message, exc.hint)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def live_ws(ws: WebSocket) -> None:
        await _live_session(state, ws)

    async def on_startup() -> None:
        state.loop = asyncio.get_running_loop()

    routes = [Route("/", page), Route("/v1/avatars", avatars), Route("/v1/status", status),
              Route("/v1/render", render, methods=["POST"]), WebSocketRoute("/v1/live", live_ws)]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        await on_startup()
        yield
        state.shutdown()

    return Starlette(routes=routes, lifespan=lifespan)


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint


def _not_audio(path: Path) -> str | None:
    """Why the uploaded file at ``path`` is not audio (``None`` when it has an audio stream);
    the message names the upload, not the server's scratch folder."""
    from gstalk.errors import InputError
    from gstalk.media import probe

    try:
        info = probe(path)
    except InputError as exc:
        return exc.message.replace(str(path.parent) + "/", "").split(" Fix:")[0]
    if info.audio is None:
        return f"{path.name} has no audio stream"
    return None


def _render_file(state: ServerState, live: LiveAvatar, audio: Path, out: Path, pose: str, blink: str,
                 gain: float | None) -> dict[str, Any]:
    """``run_render`` of the warm avatar (the code path of ``gstalk render``), paced to real time
    while live sessions run (so a render never takes more than one session's share)."""
    from gstalk.errors import GstalkError, InputError
    from gstalk.stages.render import run_render

    try:
        return run_render(live.avatar, audio, out, pose=pose, blink=blink, backend=live.renderer.backend,
                          articulation_gain=gain, reporter=_PacedReporter(state, live.fps))
    except InputError as exc:
        raise _Refused(422, "bad_audio", exc.message.replace(str(audio.parent) + "/", ""), exc.hint) from None
    except GstalkError as exc:
        raise _Refused(400, "bad_request", exc.message, exc.hint) from None


class _PacedReporter:
    """The render stage's progress reporter, used to pace it: while live sessions run, a render
    goes no faster than real time; at shutdown it stops."""

    quiet = True
    console = None

    def __init__(self, state: ServerState, fps: float):
        self.state, self.fps = state, fps

    def log(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def task(self, description: str, total: float | None):  # type: ignore[no-untyped-def]
        yield _PacedTask(self.state, self.fps)


class _PacedTask:
    def __init__(self, state: ServerState, fps: float):
        self.state, self.fps = state, fps
        self.t0, self.n = time.monotonic(), 0

    def advance(self, n: float = 1) -> None:
        if self.state.shutting_down.is_set():
            raise _Refused(503, "shutdown", "the server is shutting down")
        self.n += int(n)
        if self.state.capacity.active("live"):
            ahead = self.n / self.fps - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)
        else:
            self.t0 = time.monotonic() - self.n / self.fps

    def update(self, **fields: Any) -> None:
        pass


class _Handle:
    """The async side of one session: its outgoing queue and how it ends."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop, max_pending: int):
        self.state, self.loop = state, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.pending = 0
        self.max_pending = max_pending
        self.closing: Closing | None = None
        self.done = asyncio.Event()
        self.session: Session | None = None
        self._lock = threading.Lock()

    def emit(self, msg: bytes | str) -> None:  # worker thread
        with self._lock:
            self.pending += 1
            over = self.pending > self.max_pending
        if over:
            self.request_close(Closing(protocol.CLOSE_POLICY, "client is not reading the frames", "not_reading"))
            return
        self.loop.call_soon_threadsafe(self.out.put_nowait, msg)

    def sent(self) -> None:  # loop thread, after a message went out
        with self._lock:
            self.pending -= 1

    def request_close(self, closing: Closing) -> None:  # any thread
        def set_it() -> None:
            if self.closing is None:
                self.closing = closing
            self.done.set()

        try:
            self.loop.call_soon_threadsafe(set_it)
        except RuntimeError:  # the loop is closed
            pass


async def _live_session(state: ServerState, ws: WebSocket) -> None:
    await ws.accept()
    q = ws.query_params

    async def refuse(code: int, err: str, message: str, **extra: Any) -> None:
        with contextlib.suppress(Exception):
            await ws.send_text(protocol.error_message(err, message, **extra))
            await ws.close(code, protocol.close_reason(message))

    if not _token_ok(state, ws):
        return await refuse(protocol.CLOSE_POLICY, "token", "token missing or wrong")
    if state.shutting_down.is_set():
        return await refuse(protocol.CLOSE_GOING_AWAY, "shutdown", "server shutting down")
    live, why = _pick_avatar(state, q.get("avatar"))
    if live is None:
        return await refuse(protocol.CLOSE_POLICY, "avatar", why)
    fmt = q.get("format", "s16le")
    if fmt not in protocol.INPUT_FORMATS:
        return await refuse(protocol.CLOSE_UNSUPPORTED, "bad_format", f"format '{fmt}' is not supported: send s16le "
                            "(16-bit little-endian PCM)")
    try:
        rate = int(q.get("sample_rate", str(live.sample_rate)))
        channels = int(q.get("channels", "1"))
    except ValueError:
        return await refuse(protocol.CLOSE_UNSUPPORTED, "bad_format", "sample_rate and channels must be integers")
    if not 8000 <= rate <= 192000 or channels not in (1, 2):
        return await refuse(protocol.CLOSE_UNSUPPORTED, "bad_format",
                            f"sample_rate {rate} / channels {channels}: need 8000-192000 Hz and 1 or 2 channels")
    ticket = await _acquire(state.capacity, live.name, "live")
    if ticket is None:
        cap = state.capacity.summary()
        return await refuse(protocol.CLOSE_TRY_LATER, "capacity",
                            f"server at capacity ({cap['held']['live']} live, {cap['held']['render']} renders; "
                            f"{state.capacity.sessions_alone(live.name)} session(s) of {live.name} fit); "
                            f"retry in {RETRY_AFTER_S} s", retry_after_s=RETRY_AFTER_S)
    loop = asyncio.get_running_loop()
    limits = state.limits
    handle = _Handle(state, loop, frames_per_pending(limits, live.fps))
    session = Session(live, handle.emit, handle.request_close, in_rate=rate, channels=channels, limits=limits,
                      jpeg_quality=state.jpeg_quality, process_s=state.process_s.get(live.name, 0.04))
    handle.session = session
    state.sessions[session.id] = handle
    state.closing.add(session.id)

    async def sender() -> None:
        while True:
            msg = await handle.out.get()
            if msg is None:
                return
            if isinstance(msg, bytes):
                await ws.send_bytes(msg)
            else:
                await ws.send_text(msg)
            handle.sent()

    async def receiver() -> None:
        last = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                left = limits.max_session_s - (now - session.t0)
                idle_left = limits.idle_timeout_s - (now - last) if limits.idle_timeout_s > 0 else math.inf
                if left <= 0:
                    return handle.request_close(Closing(protocol.CLOSE_POLICY, f"session limit of "
                                                        f"{limits.max_session_s:g} s reached; reconnect to go on",
                                                        "session_limit"))
                if idle_left <= 0:
                    return handle.request_close(Closing(protocol.CLOSE_POLICY, f"no audio or ping for "
                                                        f"{limits.idle_timeout_s:g} s", "idle"))
                try:
                    msg = await asyncio.wait_for(ws.receive(), timeout=min(left, idle_left))
                except TimeoutError:
                    continue
                if msg["type"] == "websocket.disconnect":
                    return handle.request_close(Closing(protocol.CLOSE_NORMAL, "client closed"))
                last = time.monotonic()
                if msg.get("bytes") is not None:
                    session.feed(msg["bytes"])
                    if session.ahead_s() > limits.max_ahead_s:
                        return handle.request_close(Closing(
                            protocol.CLOSE_POLICY, f"audio sent faster than real time: {session.ahead_s():.1f} s "
                            f"ahead, the limit is {limits.max_ahead_s:g} s", "too_fast"))
                elif msg.get("text") is not None:
                    try:
                        obj = json.loads(msg["text"])
                        kind = obj.get("type") if isinstance(obj, dict) else None
                    except ValueError:
                        kind = None
                    if kind == "end":
                        session.end_of_speech()
                    elif kind == "ping":
                        handle.emit(json.dumps({"type": "pong", "t": obj.get("t")}))
                    else:
                        return handle.request_close(Closing(protocol.CLOSE_UNSUPPORTED, "text messages must be "
                                                            'JSON {"type": "end"} or {"type": "ping"}', "bad_message"))
        except WebSocketDisconnect:
            handle.request_close(Closing(protocol.CLOSE_NORMAL, "client closed"))

    send_task = asyncio.create_task(sender())
    recv_task = asyncio.create_task(receiver())
    try:
        await ws.send_text(json.dumps(session.ready_message()))
        session.start()
        await handle.done.wait()
    finally:
        try:
            state.capacity.mark_closing(ticket)  # a newcomer waits for this slot instead of being refused
            closing = handle.closing or Closing(protocol.CLOSE_NORMAL, "session ended")
            recv_task.cancel()
            await loop.run_in_executor(None, session.stop)
            state.sessions.pop(session.id, None)
            state.capacity.release(ticket)
            client_gone = closing.code == protocol.CLOSE_NORMAL and closing.reason == "client closed"
            if not client_gone:
                with contextlib.suppress(Exception):
                    stats = session.stats()
                    handle.out.put_nowait(json.dumps({**stats, "final": True}))
                    if closing.error is not None:
                        handle.out.put_nowait(protocol.error_message(closing.error, closing.reason, **closing.extra))
            handle.out.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(send_task, timeout=2.0)
            send_task.cancel()
            if not client_gone:
                with contextlib.suppress(Exception):
                    await ws.close(closing.code, protocol.close_reason(closing.reason))
        finally:
            state.closing.discard(session.id)  # its close is sent: a shutdown waits for this (serve.server)
