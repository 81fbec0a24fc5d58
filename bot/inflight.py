"""Counting work in flight, so a shutdown can let handlers finish their replies first, and a training child can
be lent the serving CPUs while nothing has been in flight for a while."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator


class InFlight:
    """``with in_flight.track(): ...`` around each handler; ``await in_flight.idle()`` waits for none left."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: ``time.monotonic()`` when work last started or ended (construction counts as activity)
        self.last_activity = time.monotonic()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the enclosed work as in flight."""
        self.count += 1
        self._idle.clear()
        self.last_activity = time.monotonic()
        try:
            yield
        finally:
            self.count -= 1
            self.last_activity = time.monotonic()
            if self.count == 0:
                self._idle.set()

    async def idle(self) -> None:
        """Return once nothing is in flight."""
        await self._idle.wait()

    def quiet_for(self, seconds: float, *, now: float | None = None) -> bool:
        """Whether nothing is in flight and nothing was for the last ``seconds``."""
        moment = time.monotonic() if now is None else now
        return self.count == 0 and moment - self.last_activity >= seconds
