"""A child process's thread pool that follows the CPUs it is lent.

The serving process confines an improvement run's children to the CPUs serving does not use, and lends them
the rest while nobody is chatting (``bot.subprocesses``): it changes the CPU affinity of every thread of the
child, which takes effect at once. Torch's thread pools do not notice — and OpenMP and MKL keep their sizes
per calling thread, so only the thread that computes can resize them — so the loops that do a child's heavy work
(the frozen-layer pass, training steps, evaluation batches) call :func:`follow_cpu_affinity` between steps: two
threads where two cores are lent, one again as soon as serving takes its core back (a pool larger than its
cores makes OpenMP workers wait for each other's time slices).

Only a process started with :data:`ELASTIC_CPUS_ENV` set follows its affinity; anywhere else (a benchmark's
``TORCH_THREADS``, a user's own run) the pool stays as configured.
"""

from __future__ import annotations

import os
import threading
import time

#: Set (to ``1``) in the environment of a child whose CPUs the parent lends and takes back.
ELASTIC_CPUS_ENV = "REVERIE_ELASTIC_CPUS"
#: Seconds between affinity checks: one system call per check, and a step takes longer than this anyway.
CHECK_INTERVAL_S = 0.5

_checked = threading.local()  # the pool sizes are per thread, and so is the rate limit


def follow_cpu_affinity() -> int | None:
    """Resize torch's thread pool to the CPUs this process may run on now; returns the new size when it
    changed, else ``None``. A no-op unless :data:`ELASTIC_CPUS_ENV` is set, and at most once per
    :data:`CHECK_INTERVAL_S`. Call it from the thread that computes, between steps."""
    if os.environ.get(ELASTIC_CPUS_ENV) != "1" or not hasattr(os, "sched_getaffinity"):
        return None
    moment = time.monotonic()
    if moment - getattr(_checked, "at", float("-inf")) < CHECK_INTERVAL_S:
        return None
    _checked.at = moment
    import torch

    allowed = len(os.sched_getaffinity(0))
    if allowed == torch.get_num_threads():
        return None
    torch.set_num_threads(allowed)
    return allowed
