"""``gstalk serve``: trained avatars that talk live, in a browser or for any WebSocket client.

- :mod:`gstalk.serve.live`: streamed speech -> frames (no web): the incremental feature,
  condition and render path, its look-ahead, the start-up speed measurement.
- :mod:`gstalk.serve.session`: one live session on a worker thread: the frame clock, idle
  frames when no speech arrives, skipping frames rather than slowing down, the limits.
- :mod:`gstalk.serve.capacity`: how many sessions fit, from the measured speed.
- :mod:`gstalk.serve.protocol`: the wire format of the WebSocket messages.
- :mod:`gstalk.serve.app`: the web app (routes, the page in ``static/``);
  :mod:`gstalk.serve.server`: loading, measuring, printing the URL, clean shutdown.

The web side needs the ``serve`` extra (``pip install 'gstalk[serve]'``):
:func:`require_web` names it when it is missing. Protocol and numbers: ``docs/serve.md``.
"""

from __future__ import annotations

WEB_MODULES = ("starlette", "uvicorn", "websockets", "soxr")


def require_web() -> None:
    """Check that the ``serve`` extra is installed.

    Raises:
        DependencyError: a package of the extra is missing (the message names it and the
            command that installs it).
    """
    import importlib.util

    from gstalk.errors import DependencyError

    missing = [m for m in WEB_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"gstalk serve needs {', '.join(missing)}, which are not installed.",
                              hint="pip install 'gstalk[serve]' (from a clone: pip install -e '.[serve]')")
