"""The task runner (data/shard_runner.py): results as they finish, a failing task reported and the rest
run, and pool workers that do not outlive a ``kill -9`` of the stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xrdvision.data.shard_runner import run_tasks


def test_inline_reports_a_failing_task_and_goes_on() -> None:
    out = list(run_tasks(int, ["1", "x", "3"]))
    assert [(t, r) for t, r, e in out if e is None] == [("1", 1), ("3", 3)]
    assert [e for _, _, e in out if e] == ["ValueError: invalid literal for int() with base 10: 'x'"]


def test_pool_runs_every_task(tmp_path: Path) -> None:
    out = list(run_tasks(abs, [-1, -2, -3, 4, -5], workers=2))
    assert sorted(r for _, r, _ in out) == [1, 2, 3, 4, 5]


_SCRIPT = """
import os, sys, time
from pathlib import Path
from xrdvision.data.shard_runner import run_tasks

def task(arg):
    folder, i = arg
    (Path(folder) / f"pid-{os.getpid()}").touch()
    time.sleep(0.1 if i == 0 else 60)
    return i

if __name__ == "__main__":
    for _ in run_tasks(task, [(sys.argv[1], i) for i in range(4)], workers=2):
        print("one done", flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(120)
def test_pool_workers_exit_when_the_stage_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text(_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "one done"
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("pid-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = {int(p.name[4:]) for p in tmp_path.glob("pid-*")}
    assert len(pids) == 2  # both workers, each now in a 60 s task
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids)), "pool workers outlived the killed stage"
