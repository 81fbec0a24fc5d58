"""Running heavy steps (imagination, training, evaluation) in child processes.

The event loop never blocks on them: each step is an ``asyncio`` subprocess in its own process group at
low CPU priority, with a time limit; cancelling the awaiting task terminates the whole group.

Low priority alone does not keep serving responsive: ``nice`` only matters when both want the same core, and a
child whose OpenMP pool spans every core makes the serving thread share its core with a spinning worker (on
2 cores, p50 reply latency rose ~40 % during an improvement run). So a low-priority step is also *confined*:
its CPU affinity is the CPUs serving does not use (:func:`training_cpus`; inherited by its own children) and
its thread pools are sized to them (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), so serving keeps its cores.

Confinement costs a training run half of a 2-core machine even while nobody chats, which is most of the time:
given ``lend_when`` (serving has been quiet a while), :func:`run_step` *lends* the child every CPU while it
holds and takes the serving CPUs back the moment it stops holding (affinity of every thread of the child's
process tree, :func:`set_process_cpus`); the child resizes its thread pools to what it is lent between steps
(:func:`learning.cpus.follow_cpu_affinity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from learning.cpus import ELASTIC_CPUS_ENV

logger = logging.getLogger(__name__)


class StepFailedError(RuntimeError):
    """A child step exited non-zero or ran past its time limit; the message carries the tail of its log."""


def reverie_command(*args: str) -> list[str]:
    """``reverie ARGS`` with this interpreter, independent of PATH."""
    return [sys.executable, "-m", "bot.cli", *args]


_PR_SET_PDEATHSIG = 1


def serving_threads(configured: int | None = None) -> int:
    """Threads the serving process computes with while an improvement run's child runs: ``configured`` (the
    ``TORCH_THREADS`` setting; read from the environment when not given), else half the CPUs this process may
    use, so a confined training child gets the other half. The one rule behind
    :attr:`bot.settings.Settings.resolved_torch_threads`."""
    return _configured_threads(configured) or max(1, len(_available_cpus()) // 2)


def idle_serving_threads(configured: int | None = None) -> int:
    """Threads serving computes with while no child runs: ``configured`` (as for :func:`serving_threads`), else
    every CPU this process may use; serving drops to :func:`serving_threads` while a child runs, so the two never
    oversubscribe the cores. The rule behind :attr:`bot.settings.Settings.resolved_idle_torch_threads`."""
    return _configured_threads(configured) or len(_available_cpus())


def _configured_threads(configured: int | None) -> int | None:
    """``configured``, else ``TORCH_THREADS`` from the environment where it is a positive integer."""
    if configured is None:
        text = os.environ.get("TORCH_THREADS", "").strip()
        configured = int(text) if text.isdigit() and int(text) > 0 else None
    return configured


def _available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: no affinity control
        return list(range(os.cpu_count() or 1))


def training_cpus(serving: int | None = None) -> list[int] | None:
    """The CPUs a confined child may use: those this process may use, less ``serving`` kept for serving
    (default :func:`serving_threads`); the child gets the lowest-numbered ones. ``None`` where there is nothing to
    split (one CPU, or no affinity control): the child then only runs at low priority."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    available = _available_cpus()
    if len(available) < 2:
        return None
    keep = min(serving if serving is not None else serving_threads(), len(available) - 1)
    return available[: len(available) - keep]


def confinement_env(cpus: Collection[int]) -> dict[str, str]:
    """Thread-pool sizes for a child confined to ``cpus`` (OpenMP and MKL, which torch uses on the CPU)."""
    threads = str(max(1, len(cpus)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "REVERIE_CHILD_CPUS": ",".join(map(str, cpus))}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/PID/task/TID/children``; just ``pid`` where that is not available)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                pending.extend(int(child) for child in children.read_text().split())
    return found


def set_process_cpus(pid: int, cpus: Collection[int]) -> int:
    """Move every thread of ``pid`` and of its descendants onto ``cpus`` (Linux: affinity is per thread, and a
    running child's thread pools were started with the old one). Returns how many threads moved."""
    moved = 0
    for process in _tree(pid):
        tids = [int(t.name) for t in Path(f"/proc/{process}/task").glob("*") if t.name.isdigit()] or [process]
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, set(cpus))
                moved += 1
    return moved


async def _lend_cpus(
    pid: int, confined: Collection[int], lent: Collection[int], lend_when: Callable[[], bool], interval_s: float
) -> None:
    """While the child runs: every CPU in ``lent`` while ``lend_when()`` holds, ``confined`` as soon as it does not."""
    current = set(confined)
    while True:
        wanted = set(lent) if lend_when() else set(confined)
        if wanted != current:
            set_process_cpus(pid, wanted)
            logger.info("child %d now runs on cpus %s", pid, ",".join(map(str, sorted(wanted))))
            current = wanted
        await asyncio.sleep(interval_s)


def _prepare_child(low_priority: bool, cpus: Collection[int] | None = None) -> None:
    """Runs in the child before exec: die with the parent (Linux), yield the CPU to chats, keep to ``cpus``."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if low_priority:
        with contextlib.suppress(OSError):
            os.nice(10)
    if cpus:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, set(cpus))


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _terminate_group(process: asyncio.subprocess.Process, grace_s: float) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def run_step(
    name: str,
    command: Sequence[str],
    *,
    log_path: Path,
    time_limit_s: float,
    env: Mapping[str, str] | None = None,
    low_priority: bool = True,
    grace_s: float = 10.0,
    cpus: Collection[int] | None = None,
    lend_when: Callable[[], bool] | None = None,
    lend_check_s: float = 0.25,
) -> None:
    """Run ``command`` to completion, logging to ``log_path``; raise :class:`StepFailedError` on failure.

    A ``low_priority`` step is niced and confined to ``cpus`` (default :func:`training_cpus`) with thread pools
    of that size; ``env`` may still set the pool sizes itself. With ``lend_when`` a confined child is lent every
    CPU while ``lend_when()`` holds (checked every ``lend_check_s``) and resizes its pools to follow.
    Cancellation (or the time limit) terminates the child's whole process group, SIGTERM then SIGKILL.
    """
    if cpus is None and low_priority:
        cpus = training_cpus()
    confined = confinement_env(cpus) if cpus else {}
    available = _available_cpus()
    lend = lend_when if cpus and set(available) != set(cpus) else None  # nothing to lend to an unconfined child
    if lend is not None:
        confined[ELASTIC_CPUS_ENV] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **confined, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group, so we can end grandchildren too
            # prctl, nice and sched_setaffinity: system calls only, safe before exec
            preexec_fn=functools.partial(_prepare_child, low_priority, list(cpus) if cpus else None),
        )
        logger.info("step %s started (pid %d, cpus %s)", name, process.pid, ",".join(map(str, cpus or [])) or "all")
        lender = None
        if lend is not None and cpus:
            lender = asyncio.create_task(
                _lend_cpus(process.pid, cpus, available, lend, lend_check_s), name=f"{name}-cpus"
            )
        try:
            returncode = await asyncio.wait_for(process.wait(), time_limit_s)
        except TimeoutError:
            await _terminate_group(process, grace_s)
            raise StepFailedError(f"{name} ran past its time limit of {time_limit_s:.0f}s") from None
        except asyncio.CancelledError:
            await asyncio.shield(_terminate_group(process, grace_s))
            raise
        finally:
            if lender is not None:
                lender.cancel()
    if returncode != 0:
        raise StepFailedError(f"{name} failed (exit {returncode}):\n{_log_tail(log_path)}")
