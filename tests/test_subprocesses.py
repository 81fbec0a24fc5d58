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


_TWO_CPUS = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs"
)

# A child with a second thread that reports, every 50 ms, how many CPUs its main thread and its worker thread may
# use, and how big its torch pool is after following its affinity (as a training loop does between steps).
_LENT_CHILD = """
import os, sys, threading, time
import torch
from learning.cpus import follow_cpu_affinity
worker = {}
def spin():
    while True:
        worker["cpus"] = len(os.sched_getaffinity(0))
        time.sleep(0.01)
threading.Thread(target=spin, daemon=True).start()
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    follow_cpu_affinity()
    print(len(os.sched_getaffinity(0)), worker.get("cpus"), torch.get_num_threads(), flush=True)
    time.sleep(0.05)
"""


@_TWO_CPUS
async def test_a_confined_child_is_lent_the_serving_cpus_while_serving_is_quiet(tmp_path: Path) -> None:
    """While ``lend_when`` holds the child's every thread may use every CPU and its torch pool grows to match;
    the serving CPUs are taken back as soon as it stops holding (a chat arrived)."""
    from bot.subprocesses import training_cpus

    available = sorted(os.sched_getaffinity(0))
    cpus = training_cpus(serving=1)
    assert cpus is not None and len(cpus) < len(available)
    quiet = {"now": False}
    log = tmp_path / "lent.log"
    step = asyncio.create_task(
        run_step(
            "lent",
            [sys.executable, "-c", _LENT_CHILD, "6"],
            log_path=log,
            time_limit_s=60,
            cpus=cpus,
            lend_when=lambda: quiet["now"],
            lend_check_s=0.05,
        )
    )

    async def wait_for_line(expected: str) -> None:
        for _ in range(200):
            lines = log.read_text().splitlines() if log.exists() else []
            if lines and lines[-1] == expected:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"never printed {expected!r}; last lines: {lines[-3:]}")

    confined = f"{len(cpus)} {len(cpus)} {len(cpus)}"
    lent = f"{len(available)} {len(available)} {len(available)}"
    await wait_for_line(confined)
    quiet["now"] = True
    await wait_for_line(lent)
    quiet["now"] = False  # a chat: the serving CPUs come back at once
    await wait_for_line(confined)
    await step


async def test_without_the_flag_a_process_keeps_its_pool(tmp_path: Path) -> None:
    """Only a child started to be lent CPUs follows its affinity: a user's or a benchmark's pool size stays."""
    from learning.cpus import ELASTIC_CPUS_ENV, follow_cpu_affinity

    assert os.environ.get(ELASTIC_CPUS_ENV) is None
    assert follow_cpu_affinity() is None


def test_serving_is_quiet_only_when_nothing_was_in_flight_for_a_while() -> None:
    from bot.inflight import InFlight

    in_flight = InFlight()
    start = in_flight.last_activity
    assert not in_flight.quiet_for(30, now=start + 10)
    assert in_flight.quiet_for(30, now=start + 31)
    with in_flight.track():
        assert not in_flight.quiet_for(0)  # a reply being written is activity, however long it takes
    assert not in_flight.quiet_for(30, now=in_flight.last_activity + 29)
    assert in_flight.quiet_for(30, now=in_flight.last_activity + 30)
