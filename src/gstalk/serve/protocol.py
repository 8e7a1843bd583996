"""The live session's wire format (WebSocket ``/v1/live``), shared by the server, the
benchmark client and the tests; ``docs/serve.md`` describes it for other clients.

Client -> server:
    binary messages: raw 16-bit little-endian PCM (``s16le``) at the sample rate and channel
    count given in the URL (``?sample_rate=48000&channels=1``), chunks of any size (a sample
    may even be split between two messages);
    text messages: JSON ``{"type": "end"}`` (no more speech for now: render the last words
    without waiting for more audio), ``{"type": "ping"}`` (keeps an idle session open).

Server -> client:
    text messages: JSON ``ready`` (first), ``stats`` (every 2 s), ``pong``, ``error`` (just
    before the server closes the session; ``code``, ``message``, and ``retry_after_s`` when
    the server is full);
    binary messages, one per video frame: ``uint32 LE n`` + ``n`` bytes of JSON header + the
    JPEG (``header["jpeg_bytes"]``, 0 for a skipped frame) + the frame's audio
    (``header["audio_bytes"]`` of s16le mono at ``ready["sample_rate"]``).
"""

from __future__ import annotations

import json
import struct
from typing import Any

# WebSocket close codes (RFC 6455) the server uses
CLOSE_NORMAL = 1000  # the client closed, or the session ended
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_UNSUPPORTED = 1003  # not 16-bit PCM, a WAV file instead of raw samples, a text message that is not JSON
CLOSE_POLICY = 1008  # token, unknown avatar, a limit (session length, idle, faster than real time, not reading)
CLOSE_ERROR = 1011  # a bug in the server: the message says what happened
CLOSE_TRY_LATER = 1013  # the server is at capacity: retry after ``retry_after_s``

INPUT_FORMATS = ("s16le",)


def pack_frame(header: dict[str, Any], jpeg: bytes, audio: bytes) -> bytes:
    """One binary frame message: ``uint32 LE len(header)`` + JSON header + JPEG + audio.
    ``header`` gets ``jpeg_bytes`` and ``audio_bytes``."""
    h = json.dumps({**header, "jpeg_bytes": len(jpeg), "audio_bytes": len(audio)}, separators=(",", ":")).encode()
    return struct.pack("<I", len(h)) + h + jpeg + audio


def unpack_frame(message: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, JPEG bytes, s16le audio bytes) of a binary frame message.

    Raises:
        ValueError: a truncated or malformed message.
    """
    if len(message) < 4:
        raise ValueError("frame message shorter than its 4-byte header length")
    (n,) = struct.unpack_from("<I", message, 0)
    if 4 + n > len(message):
        raise ValueError("frame message shorter than its header")
    header = json.loads(message[4:4 + n])
    a = 4 + n
    b = a + int(header["jpeg_bytes"])
    c = b + int(header["audio_bytes"])
    if c != len(message):
        raise ValueError(f"frame message has {len(message)} bytes, its header says {c}")
    return header, message[a:b], message[b:c]


def error_message(code: str, message: str, **extra: Any) -> str:
    """The JSON text of an ``error`` message."""
    return json.dumps({"type": "error", "code": code, "message": message, **extra})


def close_reason(text: str) -> str:
    """A close reason that fits the WebSocket limit (123 bytes of UTF-8)."""
    b = text.encode()
    return text if len(b) <= 123 else b[:120].decode(errors="ignore") + "..."
