"""The one exception family of gstalk, with exit codes that mean something.

Library code raises a :class:`GstalkError` subclass; the CLI prints its message (and hint)
as one red line on stderr and exits with the class's ``exit_code``. Anything else is a bug
and keeps its traceback. The codes are documented in ``docs/troubleshooting.md``.
"""

from __future__ import annotations

from pathlib import Path


class GstalkError(Exception):
    """Base class: a problem the user can fix, described in one line.

    Args:
        message: what is wrong, naming the file/frame/stage involved.
        hint: how to fix it (printed after the message), or None.
        path: the file or folder concerned, if any.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:  # one line, message then hint
        return self.message if not self.hint else f"{self.message} Fix: {self.hint}"


class UsageError(GstalkError):
    """A flag or argument is invalid or contradicts another (exit 2)."""

    exit_code = 2


class InputError(GstalkError):
    """An input file (video, audio, pose file) is missing, unreadable or unsuitable (exit 3)."""

    exit_code = 3


class WorkspaceError(GstalkError):
    """The workspace is missing a stage, is corrupt, or is from a newer gstalk (exit 4)."""

    exit_code = 4


class TrackingError(GstalkError):
    """Face tracking failed: no face, face too small, too many lost frames (exit 5)."""

    exit_code = 5


class DependencyError(GstalkError):
    """An optional dependency, backend, compiler or device is not available (exit 6)."""

    exit_code = 6


class TrainingError(GstalkError):
    """Training diverged (NaN/Inf) or cannot continue (exit 7)."""

    exit_code = 7


class LockError(GstalkError):
    """Another gstalk process holds the workspace lock (exit 8)."""

    exit_code = 8


class ResourceError(GstalkError):
    """Out of disk space or memory, or an output location is not writable (exit 9)."""

    exit_code = 9


class QualityError(GstalkError):
    """A metric is below the threshold given with ``gstalk eval --fail-under`` (exit 10)."""

    exit_code = 10


class JobsFailedError(GstalkError):
    """``gstalk batch``: one or more jobs failed; the others finished (exit 11). The results
    file names each failed row and its error."""

    exit_code = 11


DISK_FULL_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT (quota exceeded)
NOT_WRITABLE_ERRNOS = frozenset({1, 13, 30})  # EPERM, EACCES, EROFS


def resource_error(exc: OSError, path: str | Path | None = None) -> ResourceError | None:
    """The :class:`ResourceError` for an OS error that means "disk full" or "not writable",
    or None for any other OS error (a bug, or an input problem reported elsewhere).

    Args:
        exc: the OS error (``errno`` decides).
        path: the file being written; default ``exc.filename``, else unnamed.
    """
    where = path if path is not None else exc.filename
    if exc.errno in DISK_FULL_ERRNOS:
        return ResourceError(f"No space left on the device while writing {where or 'the output'}.",
                             hint="free some disk space (or choose another --workspace) and re-run the same "
                                  "command; finished stages are kept", path=where)
    if exc.errno in NOT_WRITABLE_ERRNOS:
        return ResourceError(f"Cannot write {where or 'the output'}: {exc.strerror}.",
                             hint="choose a writable workspace folder (--workspace) or fix its permissions",
                             path=where)
    return None


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "other gstalk error",
    2: "usage error (bad flag or argument)",
    3: "input error (video/audio/pose file unreadable or unsuitable)",
    4: "workspace error (missing stage, corrupt file, newer schema)",
    5: "tracking error (no face, face too small, lost track)",
    6: "dependency error (missing optional package, backend, compiler, GPU)",
    7: "training error (NaN/Inf, diverged)",
    8: "workspace locked by another gstalk process",
    9: "resource error (disk full, not writable)",
    10: "quality gate failed (a metric below `gstalk eval --fail-under`)",
    11: "batch: some jobs failed, the others finished (see the results file)",
    130: "interrupted (Ctrl-C)",
}
