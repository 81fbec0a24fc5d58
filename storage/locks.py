"""One trainer at a time, even with several bot replicas on one database.

PostgreSQL: a session-level advisory lock held on a dedicated connection for the whole run (it is released
when that connection closes, so a crashed replica never leaves it held). SQLite: a file lock beside the
database file (replicas sharing a SQLite file share a machine).

A dropped connection (a restarted server, a proxy's idle timeout, ``pg_terminate_backend``) releases the
advisory lock while the run goes on. So while held, a keeper task checks the connection every
``check_interval_s``: when it is gone it takes the lock again on a fresh connection (the lock survived; logged),
and when another process took it in between, the lock is lost: :attr:`TrainerLock.lost` is set and the task that
acquired it is cancelled, so the run stops rather than train beside another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.database import Database

logger = logging.getLogger(__name__)

#: Seconds between checks that a held PostgreSQL lock's connection is still there.
CHECK_INTERVAL_S = 5.0


def _advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_try_advisory_lock``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class TrainerLock:
    """A named, non-blocking, cross-process lock on the database.

    ``await lock.acquire()`` returns ``False`` when another process holds it; ``await lock.release()`` frees it.
    ``check_interval_s`` (PostgreSQL): how often the keeper checks the lock's connection (``None``: never; call
    :meth:`check` yourself); ``cancel_on_loss``: cancel the acquiring task when the lock is lost.
    """

    def __init__(
        self,
        database: Database,
        name: str = "reverie-trainer",
        *,
        check_interval_s: float | None = CHECK_INTERVAL_S,
        cancel_on_loss: bool = True,
    ) -> None:
        self.database = database
        self.name = name
        self.check_interval_s = check_interval_s
        self.cancel_on_loss = cancel_on_loss
        #: Set when the lock was taken by another process after this one's connection dropped.
        self.lost = asyncio.Event()
        #: How many times the lock was taken again on a fresh connection after a drop.
        self.reconnects = 0
        self._connection: AsyncConnection | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._connection_lock = asyncio.Lock()
        self._file_lock: FileLock | None = None
        if database.backend == "sqlite":
            path = make_url(database.url).database
            lock_path = Path(f"{path}.{name}.lock") if path and path != ":memory:" else Path(f".{name}.lock")
            self._file_lock = FileLock(str(lock_path))

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        if self._file_lock is not None:
            return self._file_lock.is_locked
        return self._connection is not None

    async def acquire(self) -> bool:
        """Take the lock if free; never waits."""
        if self.held:
            return True
        if self._file_lock is not None:
            try:
                self._file_lock.acquire(timeout=0)
            except Timeout:
                return False
            return True
        connection = await self._try_lock()
        if connection is None:
            return False
        self._connection = connection
        self.lost.clear()
        self._owner = asyncio.current_task()
        if self.check_interval_s is not None:
            self._keeper = asyncio.create_task(self._keep(self.check_interval_s), name=f"lock-keeper-{self.name}")
        return True

    async def _try_lock(self) -> AsyncConnection | None:
        """A fresh connection holding the advisory lock, or ``None`` when another session holds it."""
        connection = await self.database.engine.connect()
        try:
            got = (
                await connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": _advisory_key(self.name)})
            ).scalar()
            await connection.commit()
        except BaseException:
            await connection.close()
            raise
        if not got:
            await connection.close()
            return None
        return connection

    async def check(self) -> bool:
        """Whether the lock is still held; a dropped connection is replaced and the lock taken again if free.

        Returns ``False`` (and sets :attr:`lost`, cancelling the acquiring task if so configured) when another
        process took the lock meanwhile; also ``False`` when it is not held at all.
        """
        if self._file_lock is not None:
            return self._file_lock.is_locked
        async with self._connection_lock:
            connection = self._connection
            if connection is None:
                return False
            try:
                await connection.execute(text("SELECT 1"))
                await connection.commit()
                return True
            except Exception as error:
                logger.warning("trainer lock %r: its connection dropped (%s)", self.name, type(error).__name__)
                with contextlib.suppress(Exception):
                    await connection.invalidate()
                with contextlib.suppress(Exception):
                    await connection.close()
            try:
                fresh = await self._try_lock()
            except Exception as error:  # the database is not back yet: try again at the next check
                logger.warning("trainer lock %r: cannot reconnect yet (%s)", self.name, type(error).__name__)
                return True
            if fresh is not None:
                self._connection = fresh
                self.reconnects += 1
                logger.warning("trainer lock %r: taken again on a fresh connection", self.name)
                return True
            self._connection = None
        logger.error("trainer lock %r was lost to another process: stopping its holder", self.name)
        self.lost.set()
        owner = self._owner
        if self.cancel_on_loss and owner is not None and owner is not asyncio.current_task() and not owner.done():
            owner.cancel()
        return False

    async def _keep(self, interval_s: float) -> None:
        while self._connection is not None:
            await asyncio.sleep(interval_s)
            try:
                if not await self.check():
                    return
            except Exception:  # never let the keeper die silently; the next check tries again
                logger.exception("trainer lock %r: check failed", self.name)

    async def release(self) -> None:
        """Free the lock (no-op if not held)."""
        if self._file_lock is not None:
            if self._file_lock.is_locked:
                self._file_lock.release(force=True)
            return
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
        self._owner = None
        async with self._connection_lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                try:
                    await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _advisory_key(self.name)})
                    await connection.commit()
                except Exception as error:  # a dropped connection already released it
                    logger.warning("trainer lock %r: unlock failed (%s)", self.name, type(error).__name__)
                finally:
                    with contextlib.suppress(Exception):
                        await connection.close()

    async def __aenter__(self) -> bool:
        return await self.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()
