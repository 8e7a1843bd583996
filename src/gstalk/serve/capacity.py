"""How many live sessions fit, from the speed measured at start-up, and who holds them.

The rule: a session of avatar ``a`` needs ``fps_a`` frames per second, and this machine renders
``speed_a`` frames per second of it alone (:func:`gstalk.serve.live.measure_speed`: features,
conditions, one render and a JPEG per frame), so it uses ``load_a = fps_a / speed_a`` of the
machine. Sessions (and renders of ``POST /v1/render``, which count as one session each) are
admitted while the loads add up to at most ``utilisation`` (0.9: the rest is the WebSocket
I/O and the operating system); one more is refused (HTTP 503, WebSocket close 1013) rather
than slowing every stream down. ``--sessions N`` replaces the rule by N of any avatar.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

UTILISATION = 0.9


@dataclass
class Ticket:
    """A held slot: ``kind`` (``live`` or ``render``), the avatar, its load."""

    kind: str
    avatar: str
    load: float


class Capacity:
    """Admission control (see the module docstring). Thread-safe.

    Args:
        speed: measured frames/s of each avatar's live path, alone.
        fps: frames/s a session of each avatar needs.
        sessions: an explicit number of sessions replacing the measured rule, or None.
        utilisation: the share of the machine sessions may use together.
    """

    def __init__(self, speed: dict[str, float], fps: dict[str, float], sessions: int | None = None,
                 utilisation: float = UTILISATION):
        self.speed, self.fps, self.override, self.utilisation = dict(speed), dict(fps), sessions, utilisation
        self._held: list[Ticket] = []
        self._lock = threading.Lock()

    def load(self, avatar: str) -> float:
        """The share of the machine one session of ``avatar`` uses."""
        if self.override is not None:
            return 1.0 / max(self.override, 1) if self.override > 0 else math.inf
        s = self.speed.get(avatar, 0.0)
        return self.fps[avatar] / s if s > 0 else math.inf

    def sessions_alone(self, avatar: str) -> int:
        """How many sessions of ``avatar`` fit when nothing else runs."""
        if self.override is not None:
            return max(self.override, 0)
        load = self.load(avatar)
        return int(math.floor(self.utilisation / load + 1e-9)) if math.isfinite(load) else 0

    def acquire(self, avatar: str, kind: str = "live") -> Ticket | None:
        """A slot for one more session (or render) of ``avatar``, or None when it does not fit."""
        load = self.load(avatar)
        limit = 1.0 if self.override is not None else self.utilisation
        with self._lock:
            used = sum(t.load for t in self._held)
            if not math.isfinite(load) or used + load > limit + 1e-9:
                return None
            t = Ticket(kind, avatar, load)
            self._held.append(t)
            return t

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._held:
                self._held.remove(ticket)

    def active(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for t in self._held if kind is None or t.kind == kind)

    def summary(self) -> dict[str, Any]:
        """JSON-able: the rule, each avatar's speed and sessions alone, what is held now."""
        with self._lock:
            used = sum(t.load for t in self._held)
            held = {"live": sum(1 for t in self._held if t.kind == "live"),
                    "render": sum(1 for t in self._held if t.kind == "render")}
        rule = f"--sessions {self.override}" if self.override is not None else \
            f"loads fps/speed add up to at most {self.utilisation:g}"
        return {"rule": rule, "utilisation": round(used, 3), "held": held,
                "avatars": {a: {"speed_fps": round(self.speed.get(a, 0.0), 2), "fps": self.fps[a],
                                "sessions": self.sessions_alone(a)} for a in self.fps}}
