"""``gstalk serve``: load the avatars once, measure what this machine can serve, print the URL,
serve until Ctrl-C / SIGTERM, then close every session cleanly (WebSocket close 1001).

Nothing is written into a workspace or bundle: uploads and renders live in a temporary folder
that is removed with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gstalk.errors import UsageError
from gstalk.progress import SILENT, Reporter

TOKEN_ENV = "GSTALK_SERVE_TOKEN"


def _unique_names(avatars: list[Any]) -> None:
    seen: dict[str, int] = {}
    for a in avatars:
        base = a.name
        if base in seen:
            seen[base] += 1
            a.name = f"{base}-{seen[base]}"
        else:
            seen[base] = 1


def prepare(paths: list[Any], *, backend: str = "auto", sessions: int | None = None,
            measure_frames: int = 30, reporter: Reporter = SILENT, **state_kwargs: Any) -> Any:
    """Load and warm every avatar, measure each one's live speed, and build the server state.

    Args:
        paths: workspaces (fine done), bundles or unpacked bundles, each named after its
            folder or file (``obama.gstalk``: ``obama``), or
            :class:`~gstalk.serve.live.LiveAvatar` s already loaded (their own name); a
            second of the same name gets ``-2``.
        backend: rasterizer backend.
        sessions: replace the measured capacity rule by this many sessions (None: measured).
        measure_frames: frames timed per avatar at start-up.
        state_kwargs: passed to :class:`gstalk.serve.app.ServerState` (limits, token, ...).

    Returns:
        The :class:`~gstalk.serve.app.ServerState`.

    Raises:
        WorkspaceError, InputError: an avatar that cannot be loaded (named).
        UsageError: no avatar, or ``sessions`` negative.
    """
    from gstalk.serve import require_web

    require_web()
    from gstalk.serve.app import ServerState
    from gstalk.serve.capacity import Capacity
    from gstalk.serve.live import LiveAvatar, load_live_avatar, measure_capacity

    if not paths:
        raise UsageError("gstalk serve needs at least one avatar.", hint="gstalk serve WORKSPACE [WORKSPACE ...]")
    if sessions is not None and sessions < 0:
        raise UsageError(f"--sessions {sessions} must be 0 or more.")
    lives = []
    for p in paths:
        if isinstance(p, LiveAvatar):
            lives.append(p)
            continue
        reporter.log(f"loading {p}")
        live = load_live_avatar(p, backend=backend)
        # named after the folder or file given (`obama.gstalk` -> obama), not the name of the
        # workspace a bundle was exported from
        live.name = Path(p).resolve().name.removesuffix(".gstalk") or live.name
        lives.append(live)
    _unique_names(lives)
    measured: dict[str, Any] = {}
    process: dict[str, float] = {}
    for live in lives:
        kept = live.warm_backgrounds()
        with reporter.task(f"measuring {live.name}", None) as bar:
            m = measure_capacity(live, frames=measure_frames)
            bar.advance()
        m["backgrounds_kept"] = kept
        measured[live.name] = m
        process[live.name] = m["ms_per_frame"] / 1000.0
    cap = Capacity({n: m["sessions"] for n, m in measured.items()}, measured, override=sessions)
    return ServerState(avatars={lv.name: lv for lv in lives}, capacity=cap, process_s=process, **state_kwargs)


def describe(state: Any, url: str) -> dict[str, Any]:
    """The start-up summary (``--json``): URL, avatars with their measured speed and look-ahead,
    the capacity, the limits."""
    avatars = []
    for name, live in state.avatars.items():
        s = live.summary()
        m = state.capacity.measured.get(name, {})
        s.update(speed_fps=m.get("fps", 0.0), ms_per_frame=m.get("ms_per_frame", 0.0),
                 sessions=state.capacity.sessions_alone(name), measured=m.get("runs", []))
        avatars.append(s)
    lim = state.limits
    return {"url": url, "avatars": avatars, "capacity": state.capacity.summary(),
            "limits": {"max_session_s": lim.max_session_s, "idle_timeout_s": lim.idle_timeout_s,
                       "max_ahead_s": lim.max_ahead_s, "max_upload_mb": state.max_upload_bytes / 2**20},
            "token": state.token is not None, "threads": _threads()}


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def open_socket(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), opened before the avatars are
    loaded so that a taken port fails at once.

    Raises:
        UsageError: the port is taken or the host cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}.",
                         hint="pick another --port (0 picks a free one) or stop what uses it") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(state: Any, sock: socket.socket, *, reporter: Reporter = SILENT, as_json: bool = False) -> None:
    """Serve ``state`` on ``sock`` (:func:`open_socket`) until Ctrl-C / SIGTERM: prints the URL
    (with ``?token=`` when there is one) on stdout, or the :func:`describe` JSON with
    ``as_json``; progress and the capacity go to stderr. Then every session is closed with
    1001 and the process returns normally."""
    import json

    import uvicorn

    from gstalk.serve.app import create_app

    host = sock.getsockname()[0]
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{real_port}/"
    if state.token:
        url += f"?token={state.token}"
    info = describe(state, url)
    for a in info["avatars"]:
        runs = ", ".join(f"{r['streams']} at once: {r['fps']:.1f}" for r in a["measured"])
        reporter.log(f"{a['name']}: {a['model']}, {a['size']} px, {a['fps']:g} fps, look-ahead "
                     f"{a['lookahead_s'] * 1000:.0f} ms ({a['audio_features']['extractor']}); live path "
                     f"{a['ms_per_frame']:.1f} ms a frame on {info['threads']} thread(s), frames/s per stream with "
                     f"{runs}: {a['sessions']} live session(s) fit")
        if a["sessions"] == 0:
            reporter.warn(f"{a['name']}: this machine renders {a['speed_fps']:.1f} frames/s of it, a live session "
                          f"needs {a['fps']:g} (plus 10 %): its live sessions are refused (uploads still render). "
                          "Fix: a faster machine, a smaller avatar, or --sessions N to serve anyway (frames are "
                          "then skipped)")
    reporter.log(f"capacity: {info['capacity']['rule']}")
    if host not in ("127.0.0.1", "localhost", "::1") and not state.token:
        reporter.warn(f"listening on {host} without a token: anyone who reaches this machine can use it "
                      f"(set --token or ${TOKEN_ENV})")
    sys.stdout.write((json.dumps(info) if as_json else url) + "\n")
    sys.stdout.flush()

    app = create_app(state)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # Ctrl-C / SIGTERM: sessions close first
            state.shutdown()
            loop = state.loop
            if loop is None or not state.closing or self.should_exit:
                super().handle_exit(sig, frame)
                return

            # uvicorn closes open WebSockets with 1012 as soon as it starts shutting down: give
            # the sessions (up to 2 s) to send their own 1001 and close first
            async def when_closed() -> None:
                deadline = time.monotonic() + 2.0
                while state.closing and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                uvicorn.Server.handle_exit(self, sig, frame)

            loop.call_soon_threadsafe(lambda: loop.create_task(when_closed()))

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after shutting down (the process then dies by it);
            # a clean stop here exits 0 instead, as the user asked for it
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            ws_max_size=4 * 1024 * 1024, lifespan="on")
    server = Server(config)
    reporter.log(f"serving on {url} (Ctrl-C to stop)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        state.shutdown()
    reporter.log("stopped: every session closed")


class BackgroundServer:
    """A server running on a thread of this process (embedding in an application, tests):
    ``url``, and :meth:`stop`, which closes the sessions (1001) and the server.

    Args:
        state: from :func:`prepare` (or built by hand).
        host, port: where to listen (port 0: a free one).

    Raises:
        UsageError: the port cannot be bound.
    """

    def __init__(self, state: Any, host: str = "127.0.0.1", port: int = 0):
        import threading
        import time

        import uvicorn

        from gstalk.serve.app import create_app

        self.state = state
        self.sock = open_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/"
        config = uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, ws_max_size=4 * 1024 * 1024, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="gstalk-serve", daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started and self.thread.is_alive() and time.monotonic() - t0 < 30:
            time.sleep(0.02)

    def stop(self) -> None:
        self.state.shutdown()
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def token_from(flag: str | None) -> str | None:
    """The token: ``--token``, else ``$GSTALK_SERVE_TOKEN``, else None (no token)."""
    t = flag if flag is not None else os.environ.get(TOKEN_ENV)
    return t or None
