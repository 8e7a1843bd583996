"""Latency of a running ``gstalk serve``: stream a speech file over the live WebSocket at real-time
pace and time the frames that come back.

    python benchmarks/serve_latency.py --url http://127.0.0.1:8000/ --audio speech.wav --json

Prints one JSON object:

- ``first_frame_s``: from opening the connection to the first video frame (the avatar idles
  before the speech's look-ahead has arrived);
- ``first_speech_frame_s``: from sending the first audio to the first frame that shows it;
- ``latency_p50_s`` / ``latency_p95_s``: for every frame that shows the file's audio, from the
  moment the chunk holding that audio was sent to the frame's arrival (it includes the
  look-ahead the features need, ``lookahead_s``, which the server reports);
  ``latency_p95_beyond_lookahead_s`` is the p95 minus it;
- ``fps``: frames with a picture received per second while the audio was being streamed;
- ``dropped_frames``: frames the server skipped to keep real time, plus gaps in the numbering;
- ``server_rss_mb``: the server's resident memory before the session (``start``), its peak
  while streaming (``peak``, sampled every 0.25 s) and at the end (``end``).

Everything goes to the URL given (use a server on this machine: 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def _get(url: str, path: str, token: str | None) -> dict[str, Any]:
    req = urllib.request.Request(urllib.parse.urljoin(url, path))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def run(url: str, audio: str | Path, *, avatar: str | None = None, token: str | None = None, chunk_ms: float = 20.0,
        tail_s: float = 1.0, rate: int | None = None) -> dict[str, Any]:
    """Stream ``audio`` to the server at ``url`` and return the measurements (see the module docstring)."""
    from websockets.sync.client import connect

    from gstalk.media import read_audio
    from gstalk.serve.protocol import unpack_frame

    parsed = urllib.parse.urlsplit(url)
    if token is None:
        token = urllib.parse.parse_qs(parsed.query).get("token", [None])[0]
    base = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, "/", "", ""))
    avatars = _get(base, "/v1/avatars", token)["avatars"]
    info = next((a for a in avatars if a["name"] == avatar), None) if avatar else avatars[0]
    if info is None:
        raise SystemExit(f"no avatar '{avatar}' on {base}: {[a['name'] for a in avatars]}")
    sr = int(rate or info["sample_rate"])
    samples = read_audio(audio, sr)
    pcm = (np.clip(samples, -1, 1) * 32767).round().astype("<i2")
    chunk = max(1, int(round(chunk_ms / 1000 * sr)))

    rss: list[float] = []
    stop_poll = threading.Event()
    rss_start = float(_get(base, "/v1/status", token)["rss_mb"])

    def poll() -> None:
        while not stop_poll.is_set():
            try:
                rss.append(float(_get(base, "/v1/status", token)["rss_mb"]))
            except Exception:  # noqa: BLE001 - a missed sample
                pass
            stop_poll.wait(0.25)

    q = {"avatar": info["name"], "sample_rate": str(sr), "channels": "1"}
    if token:
        q["token"] = token
    ws_url = urllib.parse.urlunsplit(("wss" if parsed.scheme == "https" else "ws", parsed.netloc, "/v1/live",
                                      urllib.parse.urlencode(q), ""))
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    sent_at: list[float] = []
    frames: list[tuple[float, dict[str, Any], int]] = []
    errors: list[str] = []
    t_open = time.perf_counter()
    with connect(ws_url, max_size=None, open_timeout=10) as ws:
        ready = json.loads(ws.recv(timeout=10))
        if ready.get("type") != "ready":
            raise SystemExit(f"the server refused the session: {ready}")
        done = threading.Event()

        def send() -> None:
            t0 = time.perf_counter()
            for k, a in enumerate(range(0, len(pcm), chunk)):
                wait = t0 + k * chunk / sr - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                sent_at.append(time.perf_counter())
                ws.send(pcm[a:a + chunk].tobytes())
            ws.send(json.dumps({"type": "end"}))
            done.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        last_input = (len(pcm) - 1) / sr
        deadline = None
        while True:
            timeout = 10.0 if deadline is None else max(0.01, deadline - time.perf_counter())
            try:
                msg = ws.recv(timeout=timeout)
            except TimeoutError:
                break
            now = time.perf_counter()
            if isinstance(msg, str):
                obj = json.loads(msg)
                if obj.get("type") == "error":
                    errors.append(f"{obj.get('code')}: {obj.get('message')}")
                continue
            header, jpeg, _ = unpack_frame(msg)
            frames.append((now, header, len(jpeg)))
            if deadline is None and header.get("input_s") is not None and header["input_s"] >= last_input - 0.05:
                deadline = now + tail_s
            if deadline is None and done.is_set() and now - sent_at[-1] > 5.0:
                break
        sender.join(5)
    stop_poll.set()
    poller.join(2)
    rss_end = float(_get(base, "/v1/status", token)["rss_mb"])

    lat = []
    for now, h, _ in frames:
        x = h.get("input_s")
        if x is not None and not h.get("skipped"):
            k = min(int(x * sr) // chunk, len(sent_at) - 1)
            lat.append(now - sent_at[k])
    pictures = [f for f in frames if f[2] > 0]
    idx = [h["i"] for _, h, _ in frames]
    gaps = sum(b - a - 1 for a, b in zip(idx, idx[1:]) if b > a + 1)
    skipped = sum(1 for _, h, _ in frames if h.get("skipped"))
    t_first_send, t_last_send = (sent_at[0], sent_at[-1]) if sent_at else (t_open, t_open)
    during = [f for f in pictures if t_first_send <= f[0] <= t_last_send]
    span = t_last_send - t_first_send
    speech = [now for now, h, n in frames if h.get("input_s") is not None and n > 0]
    look = float(ready.get("lookahead_s", 0.0))
    p95 = float(np.percentile(lat, 95)) if lat else None
    return {
        "url": base, "avatar": info["name"], "audio": str(audio), "audio_s": round(len(pcm) / sr, 3),
        "size": info["size"], "sample_rate": sr, "chunk_ms": chunk_ms,
        "first_frame_s": round(pictures[0][0] - t_open, 4) if pictures else None,
        "first_speech_frame_s": round(speech[0] - t_first_send, 4) if speech else None,
        "latency_p50_s": round(float(np.percentile(lat, 50)), 4) if lat else None,
        "latency_p95_s": round(p95, 4) if p95 is not None else None,
        "latency_max_s": round(float(np.max(lat)), 4) if lat else None,
        "lookahead_s": look,
        "latency_p95_beyond_lookahead_s": round(p95 - look, 4) if p95 is not None else None,
        "fps": round(len(during) / span, 2) if span > 0 else None,
        "frames": len(frames), "frames_with_speech": len(lat), "dropped_frames": skipped + gaps,
        "server_rss_mb": {"start": rss_start, "peak": max(rss + [rss_start, rss_end]), "end": rss_end},
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the server's URL, as gstalk serve printed it")
    ap.add_argument("--audio", required=True, help="speech file to stream (any format ffmpeg reads)")
    ap.add_argument("--avatar", help="avatar name (default: the server's first)")
    ap.add_argument("--token", help="token (default: the one in the URL, if any)")
    ap.add_argument("--chunk-ms", type=float, default=20.0, help="audio per WebSocket message, ms")
    ap.add_argument("--rate", type=int, help="sample rate to send at (default: the avatar's; others are resampled "
                                             "by the server)")
    ap.add_argument("--json", action="store_true", help="print the JSON object only")
    a = ap.parse_args(argv)
    r = run(a.url, a.audio, avatar=a.avatar, token=a.token, chunk_ms=a.chunk_ms, rate=a.rate)
    if a.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:32s} {v}")
    return 0 if not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
