"""The active policy and its hot swap.

A turn leases the policy once at its start (``with holder.current() as policy:``) and uses that object
until it ends, so a swap in the middle of a turn never mixes two models. :meth:`PolicyHolder.swap`
installs the new policy at once for every later turn; the old one is closed when its last lease ends.
The holder also owns how many threads serving decodes with now (:meth:`PolicyHolder.set_threads`): all the
CPUs while nothing else of ours computes, serving's share while an improvement run's child does.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from learning.interface import Policy

logger = logging.getLogger(__name__)


class PolicyLease:
    """One turn's hold on a policy: a context manager that yields the policy and releases it on exit."""

    def __init__(self, holder: PolicyHolder, policy: Policy) -> None:
        self._holder = holder
        self.policy = policy
        self._released = False

    def __enter__(self) -> Policy:
        return self.policy

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        """Give the policy back (idempotent)."""
        if not self._released:
            self._released = True
            self._holder._release(self.policy)


class PolicyHolder:
    """Holds the active :class:`~learning.interface.Policy`; reference-counts leases to close old ones safely.

    Thread-safe, so the improvement loop may swap from a worker thread while turns run on the event loop.
    """

    def __init__(self, policy: Policy, *, threads: int | None = None) -> None:
        self._lock = threading.Lock()
        self._active = policy
        self._threads = threads
        _apply_threads(policy, threads)
        self._leases: dict[int, int] = {}  # id(policy) -> leases held
        self._retiring: dict[int, Policy] = {}  # swapped out, waiting for their last lease
        self._closed = False

    @property
    def active(self) -> Policy:
        """The policy new turns get (for display; a turn uses :meth:`current`)."""
        return self._active

    @property
    def version_id(self) -> int | None:
        """``PolicyVersion.id`` of the active policy, ``None`` for the prompted base model."""
        return self._active.version_id

    @property
    def name(self) -> str:
        """Short label of the active policy."""
        return self._active.name

    @property
    def threads(self) -> int | None:
        """Threads serving decodes with now (``None``: as each policy was loaded)."""
        return self._threads

    def set_threads(self, threads: int | None) -> None:
        """Decode with ``threads`` from the active policy's next step on, and give every later swap the same
        (a policy without a ``threads`` attribute — not the engine's — is left as it is)."""
        with self._lock:
            self._threads = threads
            policy = self._active
        _apply_threads(policy, threads)
        logger.info("serving decodes with %s threads", threads)

    def current(self) -> PolicyLease:
        """Lease the active policy for one turn: ``with holder.current() as policy: ...``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the policy holder is closed")
            policy = self._active
            self._leases[id(policy)] = self._leases.get(id(policy), 0) + 1
        return PolicyLease(self, policy)

    def leases(self, policy: Policy | None = None) -> int:
        """How many turns hold ``policy`` (default: the active one) right now."""
        with self._lock:
            return self._leases.get(id(policy or self._active), 0)

    def swap(self, new: Policy, *, close_old: bool = True) -> Policy:
        """Make ``new`` active at once and return the old policy.

        With ``close_old`` the old policy is closed as soon as no turn holds it (immediately if none
        does); pass ``False`` to keep it open and close it yourself.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the policy holder is closed")
            old, self._active = self._active, new
            _apply_threads(new, self._threads)
            to_close = None
            if old is not new and close_old:
                if self._leases.get(id(old), 0) == 0:
                    to_close = old
                else:
                    self._retiring[id(old)] = old
        logger.info("policy swapped: %s -> %s", old.name, new.name)
        if to_close is not None:
            _close_quietly(to_close)
        return old

    def close(self) -> None:
        """Close the active policy and any retiring one still waiting for leases (at process exit)."""
        with self._lock:
            self._closed = True
            policies = [self._active, *self._retiring.values()]
            self._retiring.clear()
        for policy in policies:
            _close_quietly(policy)

    def _release(self, policy: Policy) -> None:
        with self._lock:
            remaining = self._leases.get(id(policy), 0) - 1
            if remaining > 0:
                self._leases[id(policy)] = remaining
                return
            self._leases.pop(id(policy), None)
            to_close = self._retiring.pop(id(policy), None)
        if to_close is not None:
            _close_quietly(to_close)


def _apply_threads(policy: Policy, threads: int | None) -> None:
    if threads is not None and hasattr(policy, "threads"):
        policy.threads = threads


def _close_quietly(policy: Policy) -> None:
    # A policy that fails to close must not take a swap or a turn down with it.
    try:
        policy.close()
    except Exception:
        logger.exception("closing policy %s failed", policy.name)
