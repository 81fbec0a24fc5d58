"""Running heavy steps (imagination, training, evaluation) in child processes.

The event loop never blocks on them: each step is an ``asyncio`` subprocess in its own process group at
low CPU priority, with a time limit; cancelling the awaiting task terminates the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


class StepFailedError(RuntimeError):
    """A child step exited non-zero or ran past its time limit; the message carries the tail of its log."""


def reverie_command(*args: str) -> list[str]:
    """``reverie ARGS`` with this interpreter, independent of PATH."""
    return [sys.executable, "-m", "bot.cli", *args]


_PR_SET_PDEATHSIG = 1


def _prepare_child(low_priority: bool) -> None:
    """Runs in the child before exec: die with the parent (Linux), and yield the CPU to chats."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if low_priority:
        with contextlib.suppress(OSError):
            os.nice(10)


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
) -> None:
    """Run ``command`` to completion, logging to ``log_path``; raise :class:`StepFailedError` on failure.

    Cancellation (or the time limit) terminates the child's whole process group, SIGTERM then SIGKILL.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group, so we can end grandchildren too
            preexec_fn=functools.partial(_prepare_child, low_priority),  # prctl + nice only: safe before exec
        )
        logger.info("step %s started (pid %d)", name, process.pid)
        try:
            returncode = await asyncio.wait_for(process.wait(), time_limit_s)
        except TimeoutError:
            await _terminate_group(process, grace_s)
            raise StepFailedError(f"{name} ran past its time limit of {time_limit_s:.0f}s") from None
        except asyncio.CancelledError:
            await asyncio.shield(_terminate_group(process, grace_s))
            raise
    if returncode != 0:
        raise StepFailedError(f"{name} failed (exit {returncode}):\n{_log_tail(log_path)}")
