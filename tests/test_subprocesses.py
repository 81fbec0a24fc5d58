"""Child steps: failure reporting, time limits and cancellation end the whole process group."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from bot.subprocesses import StepFailedError, run_step


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_success_and_failure_with_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    await run_step("ok", [sys.executable, "-c", "print('hello')"], log_path=log, time_limit_s=30)
    assert "hello" in log.read_text()
    with pytest.raises(StepFailedError, match=r"exit 3[\s\S]*bad data"):
        await run_step(
            "bad", [sys.executable, "-c", "import sys; print('bad data'); sys.exit(3)"], log_path=log, time_limit_s=30
        )


async def test_time_limit_kills_children_too(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time;"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    with pytest.raises(StepFailedError, match="time limit"):
        await run_step("slow", [sys.executable, "-c", script], log_path=tmp_path / "l", time_limit_s=2, grace_s=1)
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        await asyncio.sleep(0.1)
    assert not _alive(grandchild)


async def test_cancellation_terminates_the_step(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    task = asyncio.create_task(
        run_step("long", [sys.executable, "-c", script], log_path=tmp_path / "l", time_limit_s=60, grace_s=1)
    )
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _alive(int(pid_file.read_text()))


def test_a_step_dies_with_its_parent(tmp_path: Path) -> None:
    """A killed server (SIGKILL: no cleanup runs) must not leave a trainer running."""
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = (
        "import asyncio, sys; from pathlib import Path; from bot.subprocesses import run_step;"
        f"asyncio.run(run_step('x', [sys.executable, '-c', {child!r}], log_path=Path({str(tmp_path / 'l')!r}),"
        " time_limit_s=60))"
    )
    process = subprocess.Popen([sys.executable, "-c", parent])
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    grandchild = int(pid_file.read_text())
    for _ in range(100):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(grandchild)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
async def test_a_low_priority_step_keeps_off_the_serving_cpus(tmp_path: Path) -> None:
    """Training children get the CPUs serving does not use, and thread pools of that size (not only nice)."""
    from bot.subprocesses import training_cpus

    available = sorted(os.sched_getaffinity(0))
    cpus = training_cpus(serving=1)
    assert cpus == available[:-1]
    log = tmp_path / "step.log"
    script = "import os; print(sorted(os.sched_getaffinity(0)), os.environ.get('OMP_NUM_THREADS'), os.nice(0))"
    await run_step("confined", [sys.executable, "-c", script], log_path=log, time_limit_s=30, cpus=cpus)
    niceness = min(os.nice(0) + 10, 19)  # ten steps below this process (a suite run under `nice` starts higher)
    assert log.read_text().split("\n")[0] == f"{cpus} {len(cpus)} {niceness}"
    await run_step("free", [sys.executable, "-c", script], log_path=log, time_limit_s=30, low_priority=False)
    assert log.read_text().split("\n")[1].startswith(f"{available} ")
    assert training_cpus(serving=len(available) + 3) == available[:1]  # a child always gets one CPU
