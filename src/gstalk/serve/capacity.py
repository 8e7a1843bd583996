"""How many live sessions fit, measured at start-up, and who holds them.

The rule: at start-up, 1, 2, 3, ... streams of each avatar run at once on this machine
(:func:`gstalk.serve.live.measure_capacity`: audio features, conditions, a render and a JPEG
per frame, on threads as sessions run) until the slowest stream falls below ``fps / 0.9``
frames per second (10 % kept for the WebSocket I/O and the operating system). The last count
that kept up, ``N_a``, is what the avatar's sessions may use: each session of avatar ``a``
takes ``1 / N_a`` of the machine. Sessions, and renders of ``POST /v1/render`` (which count as
one session each; of an avatar of which no session fits, a render takes the whole machine),
are admitted while the shares add up to at most 1; one more is refused
(HTTP 503, WebSocket close 1013, with a retry hint) rather than slowing every stream down.
A session that is closing holds its slot until its render thread has stopped; it is marked
(:meth:`Capacity.mark_closing`) so that a newcomer that fits once it is gone waits for it
rather than being refused (a page reloaded, a client that reconnects at once).
``--sessions N`` replaces the measurement by N of any avatar.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class Ticket:
    """A held slot: ``kind`` (``live`` or ``render``), the avatar, its share of the machine,
    and whether its holder is closing (it will be released within seconds)."""

    kind: str
    avatar: str
    load: float
    closing: bool = False


class Capacity:
    """Admission control (see the module docstring). Thread-safe.

    Args:
        sessions: avatar name -> sessions that fit (measured).
        measured: avatar name -> the measurement (for the summary), optional.
        override: ``--sessions N``: N sessions of any avatar instead of the measurement.
    """

    def __init__(self, sessions: dict[str, int], measured: dict[str, Any] | None = None,
                 override: int | None = None):
        self.sessions, self.measured, self.override = dict(sessions), dict(measured or {}), override
        self._held: list[Ticket] = []
        self._lock = threading.Lock()

    def sessions_alone(self, avatar: str) -> int:
        """How many sessions of ``avatar`` fit when nothing else runs."""
        return max(self.override, 0) if self.override is not None else max(self.sessions.get(avatar, 0), 0)

    def load(self, avatar: str) -> float | None:
        """The share of the machine one session of ``avatar`` takes (None: none fits)."""
        n = self.sessions_alone(avatar)
        return 1.0 / n if n > 0 else None

    def _load_of(self, avatar: str, kind: str) -> float | None:
        load = self.load(avatar)
        if load is None and kind == "render":
            return 1.0  # no live session fits: a render still may, when it has the machine to itself
        return load

    def acquire(self, avatar: str, kind: str = "live") -> Ticket | None:
        """A slot for one more session (or render) of ``avatar``, or None when it does not fit."""
        load = self._load_of(avatar, kind)
        if load is None:
            return None
        with self._lock:
            if sum(t.load for t in self._held) + load > 1.0 + 1e-9:
                return None
            t = Ticket(kind, avatar, load)
            self._held.append(t)
            return t

    def mark_closing(self, ticket: Ticket) -> None:
        """Say that ``ticket``'s holder is closing: :meth:`release` follows within seconds."""
        with self._lock:
            ticket.closing = True

    def fits_once_closed(self, avatar: str, kind: str = "live") -> bool:
        """Whether one more session (or render) of ``avatar`` will fit once the closing holders
        have released their slots (False when it would not fit even then, or none is closing)."""
        load = self._load_of(avatar, kind)
        if load is None:
            return False
        with self._lock:
            if not any(t.closing for t in self._held):
                return False
            return sum(t.load for t in self._held if not t.closing) + load <= 1.0 + 1e-9

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._held:
                self._held.remove(ticket)

    def active(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for t in self._held if kind is None or t.kind == kind)

    def summary(self) -> dict[str, Any]:
        """JSON-able: the rule, each avatar's sessions and measurement, what is held now."""
        with self._lock:
            used = sum(t.load for t in self._held)
            held = {"live": sum(1 for t in self._held if t.kind == "live"),
                    "render": sum(1 for t in self._held if t.kind == "render")}
        rule = f"--sessions {self.override}" if self.override is not None else \
            "measured: the most streams at once that each kept 25 frames/s / 0.9"
        return {"rule": rule, "used": round(used, 3), "held": held,
                "avatars": {a: {"sessions": self.sessions_alone(a), **({"measured": self.measured[a]}
                                                                     if a in self.measured else {})}
                            for a in self.sessions}}
