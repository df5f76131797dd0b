"""Run one function over many inputs in worker processes, each input under a hard time limit.

Why: a few CIFs take minutes, some in C code (spglib, HDF5) where no Python-level timeout reaches, and an
odd file can crash its process (a segfault, an out-of-memory kill). ``pebble.ProcessPool`` does the
process management: it kills a worker whose task overruns its ``timeout`` (the clock starts when a
started-up worker takes the task, so start-up never counts) and starts a new one, and it reports a
worker that died. This module adds what a batch stage needs around it: each result handed to a callback
in the calling thread as soon as it is done (so the caller's sqlite cache and progress bar stay in one
thread), a timeout or a dead worker as a :class:`TaskFailure` with a one-line reason instead of an
exception, workers whose stdout/stderr are silenced, and a forkserver that imports the heavy modules
once, so that replacing a killed worker costs milliseconds rather than seconds of imports.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from pebble import ProcessExpired, ProcessPool

from xrdvision.errors import XrdVisionError, one_line


@dataclass(frozen=True)
class TaskFailure:
    """A task that gave no result: killed at its time limit, its worker died, or it raised."""

    reason: str  # one line: "timeout after 60 s", "worker died (exit code -9)", "<Type>: <message>"
    seconds: float = 0.0
    timeout: bool = False
    crashed: bool = False


def silence_output() -> None:
    """Point this process's stdout/stderr at /dev/null: xrayutilities, pymatgen and spglib print
    warnings (some from C), and the user's terminal belongs to the progress bar and the summary."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"))  # noqa: SIM115 - lives as long as the worker
    sys.stderr = sys.stdout
    warnings.simplefilter("ignore")


def _start_worker(quiet: bool, initializer: Callable[[], None] | None) -> None:
    if quiet:
        silence_output()
    if initializer is not None:
        initializer()


def _mp_context(preload: Sequence[str]) -> Any:
    """forkserver where there is one: workers fork from a clean server that has the heavy modules
    imported once (fast replacement after a timeout kill, no state from the parent's threads)."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def _outcome(future: Any, timeout_s: float) -> Any:
    """The task's return value, or a :class:`TaskFailure` saying why there is none."""
    exc = future.exception()
    if exc is None:
        return future.result()
    if isinstance(exc, TimeoutError) and exc.args[:1] == ("Task timeout",):  # pebble's, not the task's
        return TaskFailure(f"timeout after {timeout_s:g} s", float(timeout_s), timeout=True)
    if isinstance(exc, ProcessExpired):
        return TaskFailure(f"worker died (exit code {exc.exitcode})", crashed=True)
    if isinstance(exc, BrokenProcessPool):
        raise XrdVisionError(f"worker processes die on start-up ({one_line(exc)})") from None
    return TaskFailure(one_line(exc))


def run_pool(
    function: Callable[..., Any],
    tasks: Iterable[tuple[int, tuple[Any, ...]]],
    on_result: Callable[[int, Any], None],
    *,
    workers: int,
    timeout_s: float,
    initializer: Callable[[], None] | None = None,
    preload: Sequence[str] = (),
    quiet: bool = True,
) -> None:
    """Run ``function(*args)`` for every ``(index, args)`` of ``tasks`` in ``workers`` processes.

    ``on_result(index, value)`` is called in this thread as each task finishes, in completion order,
    with the function's return value or a :class:`TaskFailure` (timeout, dead worker, an exception).
    Tasks start in the order given. ``initializer`` runs once in each new worker, after its output is
    silenced (``quiet``); ``preload`` names the modules the forkserver imports for all workers. An
    exception in ``on_result`` (or Ctrl-C) stops the workers and propagates.
    """
    tasks = list(tasks)
    if not tasks:
        return
    pool = ProcessPool(
        max_workers=min(workers, len(tasks)),
        initializer=_start_worker,
        initargs=(quiet, initializer),
        context=_mp_context(preload),
    )
    try:
        futures = {pool.schedule(function, args=args, timeout=timeout_s): index for index, args in tasks}
        for future in as_completed(futures):
            on_result(futures[future], _outcome(future, timeout_s))
    finally:
        pool.stop()
        pool.join()
