"""The worker pool (pebble underneath): results by index, a hard time limit, a dead worker replaced."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from xrdvision.data.pool import TaskFailure, run_pool
from xrdvision.errors import XrdVisionError


def _collect(function: Callable[..., Any], args: list[tuple], **kw: Any) -> dict[int, Any]:
    """``run_pool`` over ``args``: what ``on_result`` got, by index (each index exactly once)."""
    out: dict[int, Any] = {}

    def on_result(index: int, value: Any) -> None:
        assert index not in out
        out[index] = value

    run_pool(function, list(enumerate(args)), on_result, **kw)
    assert sorted(out) == list(range(len(args)))
    return out


def _abort_or_pid(abort: bool) -> int:
    """Kill this process the hard way (SIGABRT, as a segfault would with SIGSEGV), or say who we are."""
    if abort:
        os.abort()
    return os.getpid()


def test_results_come_back_by_index_whatever_the_worker_count() -> None:
    for workers in (1, 3):
        got = _collect(pow, [(i, 2) for i in range(12)], workers=workers, timeout_s=30)
        assert got == {i: i * i for i in range(12)}


def test_a_task_over_its_limit_is_killed_and_the_rest_go_on() -> None:
    """time.sleep(30) under a 0.5 s limit: the worker is killed (not waited for) and replaced, so one
    worker still runs the two tasks after it, and the limit is reported on one line."""
    t0 = time.perf_counter()
    got = _collect(time.sleep, [(30,), (0,), (0,)], workers=1, timeout_s=0.5)
    assert time.perf_counter() - t0 < 15
    assert got[0] == TaskFailure("timeout after 0.5 s", 0.5, timeout=True)
    assert got[1] is None and got[2] is None


def test_a_worker_that_dies_is_reported_and_replaced() -> None:
    """A worker killed by a signal: that task is a "worker died" failure with the exit code, and the
    next task runs in a new worker."""
    got = _collect(_abort_or_pid, [(True,), (False,)], workers=1, timeout_s=30)
    assert got[0] == TaskFailure("worker died (exit code -6)", crashed=True)
    assert isinstance(got[1], int) and got[1] != os.getpid()


def test_an_exception_in_the_task_is_one_line() -> None:
    got = _collect(int, [("x",), ("7",)], workers=2, timeout_s=30)
    assert got[0] == TaskFailure("ValueError: invalid literal for int() with base 10: 'x'")
    assert got[1] == 7


def test_workers_that_cannot_start_stop_the_run_with_one_line() -> None:
    with pytest.raises(XrdVisionError, match="worker processes die on start-up"):
        _collect(pow, [(2, 2)], workers=1, timeout_s=30, initializer=os.abort)


def test_no_tasks_starts_no_process() -> None:
    run_pool(pow, [], lambda i, v: pytest.fail("called"), workers=2, timeout_s=1)
