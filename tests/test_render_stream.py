"""The render stream's bounded prefetch (gstalk.render.driver.prefetch)."""

from __future__ import annotations

import threading
import time

import pytest

from gstalk.render.driver import prefetch


def test_prefetch_keeps_order_and_values():
    assert list(prefetch(lambda x: x * x, range(50), depth=4)) == [x * x for x in range(50)]
    assert list(prefetch(lambda x: x, [], depth=4)) == []


def test_prefetch_runs_at_most_depth_ahead():
    made = []
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            made.append(x)
        return x

    it = prefetch(work, range(1000), depth=3)
    assert next(it) == 0
    time.sleep(0.2)  # give the worker every chance to run ahead
    with lock:
        ahead = len(made)
    # consumed 1; the queue holds at most 3 more, and the worker may hold one it cannot put
    assert ahead <= 1 + 3 + 1, ahead
    it.close()


def test_prefetch_raises_the_workers_error_in_the_consumer():
    def work(x: int) -> int:
        if x == 5:
            raise ValueError("frame 5 is broken")
        return x

    got = []
    with pytest.raises(ValueError, match="frame 5"):
        for v in prefetch(work, range(10), depth=2):
            got.append(v)
    assert got == [0, 1, 2, 3, 4]


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    before = {t.ident for t in threading.enumerate()}
    it = prefetch(lambda x: x, range(10**9), depth=2)
    assert next(it) == 0
    it.close()  # what a `break` out of the render loop does
    time.sleep(0.05)
    left = [t for t in threading.enumerate() if t.ident not in before and t.name == "gstalk-prefetch"]
    assert not left
