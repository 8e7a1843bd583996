"""Interrupt a training stage at a chosen step, as Ctrl-C would (shared by the resume tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def interrupt_at(monkeypatch: pytest.MonkeyPatch, trainer_cls: type, step: int, run: Callable[[], object]) -> None:
    """Call ``run()`` with ``trainer_cls.train_step`` raising KeyboardInterrupt when the
    trainer is about to take step ``step``; assert that it was raised. The patch is undone
    afterwards."""
    real_step = trainer_cls.train_step

    def dying_step(self):  # type: ignore[no-untyped-def]
        if self.step == step:
            raise KeyboardInterrupt
        return real_step(self)

    with monkeypatch.context() as m:
        m.setattr(trainer_cls, "train_step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            run()
