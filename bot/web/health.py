"""What ``/readyz`` reports about the platform adapters: which are expected, which are connected now."""

from __future__ import annotations

import threading


class AdapterHealth:
    """The adapters a process runs and whether each is connected to its platform now.

    Adapters call :meth:`connected` once they take updates and :meth:`disconnected` when they stop or lose the
    platform; :mod:`bot.server` declares the expected ones with :meth:`expect`. Thread-safe (cheap lock).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: set[str] = set()
        self._connected: set[str] = set()

    def expect(self, *names: str) -> None:
        """Declare adapters this process runs: ``/readyz`` waits for each of them."""
        with self._lock:
            self._expected.update(names)

    def connected(self, name: str) -> None:
        """``name`` takes updates now."""
        with self._lock:
            self._connected.add(name)

    def disconnected(self, name: str) -> None:
        """``name`` no longer takes updates."""
        with self._lock:
            self._connected.discard(name)

    def missing(self) -> list[str]:
        """Expected adapters that are not connected, sorted."""
        with self._lock:
            return sorted(self._expected - self._connected)

    def states(self) -> dict[str, bool]:
        """Every expected adapter and whether it is connected."""
        with self._lock:
            return {name: name in self._connected for name in sorted(self._expected)}


#: The process's adapters (one serving process per interpreter; tests create their own instances).
ADAPTERS = AdapterHealth()
