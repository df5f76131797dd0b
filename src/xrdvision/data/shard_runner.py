"""Independent tasks run here (in-process or a process pool) or on a Dask cluster; results as they finish.

Why Dask? A sharded stage is embarrassingly parallel, and Dask's ``distributed`` scheduler is what HPC
sites (dask-jobqueue on SLURM/PBS/SGE) and Kubernetes (dask-kubernetes, the Dask Helm chart) already
run; a ``tcp://host:8786`` address is all this code needs to use one. The stage stays the one place
that writes files: a task returns its result (a shard's bytes) to the caller, so workers need the
package and the input data, never write access to the output folder.

``scheduler`` is ``"local"`` (``workers`` 1: in this process; more: a process pool, forkserver
context, no fork of a process that may hold threads) or a Dask scheduler address. A task that raises is
reported as ``(task, None, "<Type>: <message>")``; the others go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from xrdvision.errors import ConfigError, one_line

log = logging.getLogger(__name__)

Outcome = tuple[Any, Any, str | None]  # (task, result or None, error line or None)


def is_local(scheduler: str) -> bool:
    return scheduler == "local"


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    scheduler: str = "local",
    workers: int = 1,
    key: Callable[[Any], str] = str,
    connect_timeout: float = 30.0,
) -> Iterator[Outcome]:
    """``fn(task)`` for every task, yielded as they finish (any order). ``fn`` must be a module-level
    function (it is pickled to the workers); ``key`` names a task on a Dask cluster (unique, stable);
    ``connect_timeout`` (s) is how long a Dask scheduler may take to answer."""
    if not tasks:
        return
    if is_local(scheduler):
        if workers <= 1 or len(tasks) == 1:
            yield from _inline(fn, tasks)
        else:
            yield from _pool(fn, tasks, workers)
    else:
        yield from _dask(fn, tasks, scheduler, key, connect_timeout)


def _inline(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[Outcome]:
    for task in tasks:
        try:
            result = fn(task)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            yield task, None, one_line(exc)
            continue
        yield task, result, None


def _exit_with_parent() -> None:
    """Pool-worker initializer: exit when the process that started the pool is gone. A worker blocks on
    a queue whose write end it holds itself, so after a ``kill -9`` of the stage it would wait forever."""
    parent = multiprocessing.parent_process()
    if parent is None:  # pragma: no cover - always set in a pool worker
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def bounded(
    pool: Any, fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int
) -> Iterator[tuple[Any, Future[Any]]]:
    """``(task, finished future)`` as tasks finish, at most two per worker in flight: results come back
    as they are ready and memory stays flat however many tasks there are (also the benchmarks' feed)."""
    pending: dict[Future[Any], Any] = {}
    todo = iter(tasks)
    for task in todo:
        pending[pool.submit(fn, task)] = task
        if len(pending) >= 2 * workers:
            break
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            yield pending.pop(fut), fut
            nxt = next(todo, None)
            if nxt is not None:
                pending[pool.submit(fn, nxt)] = nxt


def _pool(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int) -> Iterator[Outcome]:
    ctx = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_exit_with_parent
    )
    try:
        for task, fut in bounded(pool, fn, tasks, workers):
            exc = fut.exception()
            yield (task, None, one_line(exc)) if exc else (task, fut.result(), None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _dask(
    fn: Callable[[Any], Any], tasks: Sequence[Any], address: str, key: Callable[[Any], str], timeout: float
) -> Iterator[Outcome]:
    try:
        from distributed import Client, as_completed
    except ImportError:  # pragma: no cover - pinned in requirements.lock
        raise ConfigError(
            f"mp.scheduler: {address} needs the 'distributed' package (pip install distributed)"
        ) from None
    try:
        client = Client(address, timeout=f"{timeout}s", set_as_default=False)
    except OSError as exc:
        raise ConfigError(f"mp.scheduler: no Dask scheduler answers at {address} ({exc})") from None
    try:
        info = client.scheduler_info()
        log.info("Dask scheduler %s: %d workers", address, len(info.get("workers", {})))
        futures = {client.submit(fn, task, key=key(task), retries=1): task for task in tasks}
        for fut in as_completed(futures, loop=client.loop):
            task = futures[fut]
            try:
                result = fut.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                yield task, None, one_line(exc)
                continue
            fut.release()
            yield task, result, None
    finally:
        client.close()
