"""Progress bars and log lines on stderr (rich), so stdout carries only results.

Stages take a :class:`Reporter`; the CLI builds one from ``--quiet``. Library users can
pass :data:`SILENT`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class Task:
    """A running progress bar; ``advance(n)`` and ``set(**fields)`` update it."""

    def __init__(self, progress: Any | None, task_id: Any | None):
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._id, n)

    def update(self, **fields: Any) -> None:
        """Update the bar's extra text, e.g. ``update(info="loss 0.031")``."""
        if self._p is not None:
            self._p.update(self._id, **fields)


class Reporter:
    """Writes progress and messages to stderr.

    Args:
        quiet: print nothing but warnings.
        console: a ``rich.console.Console`` (defaults to one on stderr).
    """

    def __init__(self, quiet: bool = False, console: Any | None = None):
        self.quiet = quiet
        if console is None and not quiet:
            from rich.console import Console

            console = Console(stderr=True, highlight=False)
        self.console = console

    def log(self, message: str) -> None:
        """One informational line (suppressed by --quiet)."""
        if not self.quiet and self.console is not None:
            self.console.print(message)

    def warn(self, message: str) -> None:
        """A warning line, always shown."""
        if self.console is not None:
            self.console.print(f"[yellow]warning:[/yellow] {message}")
        else:
            print(f"warning: {message}", file=sys.stderr)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Task]:
        """A progress bar for ``total`` steps (None: indeterminate)."""
        if self.quiet or self.console is None:
            yield Task(None, None)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*cols, console=self.console, transient=False) as p:
            tid = p.add_task(description, total=total, info="")
            yield Task(p, tid)


SILENT = Reporter(quiet=True, console=None)


def print_table(table: Any, *, stderr: bool = False) -> None:
    """Print a rich Table on stdout (or stderr); piped or captured output gets 200 columns
    instead of being squeezed into 80."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=200)
    console.print(table)
