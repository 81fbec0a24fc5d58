"""One trainer at a time, even with several bot replicas on one database.

PostgreSQL: a session-level advisory lock held on a dedicated connection for the whole run (it is released
when that connection closes, so a crashed replica never leaves it held). SQLite: a file lock beside the
database file (replicas sharing a SQLite file share a machine).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.database import Database


def _advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_try_advisory_lock``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class TrainerLock:
    """A named, non-blocking, cross-process lock on the database.

    ``await lock.acquire()`` returns ``False`` when another process holds it; ``await lock.release()`` frees it.
    """

    def __init__(self, database: Database, name: str = "reverie-trainer") -> None:
        self.database = database
        self.name = name
        self._connection: AsyncConnection | None = None
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
            return False
        self._connection = connection
        return True

    async def release(self) -> None:
        """Free the lock (no-op if not held)."""
        if self._file_lock is not None:
            if self._file_lock.is_locked:
                self._file_lock.release(force=True)
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _advisory_key(self.name)})
                await connection.commit()
            finally:
                await connection.close()

    async def __aenter__(self) -> bool:
        return await self.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()
