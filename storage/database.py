"""Engine and session set-up from a database URL.

One :class:`Database` per process. SQLite (the default) runs in WAL mode with foreign keys on and a busy
timeout; PostgreSQL works by changing the URL. Async sessions serve the bot; a sync engine serves
migrations and the trainer subprocess.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class DatabaseUnavailableError(RuntimeError):
    """The database stayed locked or unreachable after every retry."""


def sync_url(url: str) -> str:
    """The URL for a synchronous driver (``sqlite``, ``postgresql+psycopg``)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite").render_as_string(hide_password=False)
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def async_url(url: str) -> str:
    """The URL for an asyncio driver (``sqlite+aiosqlite``, ``postgresql+psycopg``)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def redacted(url: str) -> str:
    """The URL with its password masked, for logs and ``/status``."""
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Deleted rows (a /forget) are overwritten with zeros instead of lingering in free pages of the file.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _is_transient(error: BaseException) -> bool:
    """Locked SQLite, a dropped PostgreSQL connection: worth another try."""
    if isinstance(error, OperationalError | DBAPIError) and getattr(error, "connection_invalidated", False):
        return True
    message = str(error).lower()
    return isinstance(error, OperationalError) and any(
        marker in message
        for marker in ("database is locked", "database is busy", "connection", "server closed", "terminating")
    )


def retry_transient(
    attempts: int = 6, base_delay: float = 0.05
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Retry an async database operation on transient errors with jittered exponential backoff.

    The wrapped operation must be one transaction so a retry never applies half of it twice.
    """

    def decorate(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        def delay(state: RetryCallState) -> float:
            return base_delay * 2 ** (state.attempt_number - 1) * (1 + random.random())

        def log(state: RetryCallState) -> None:
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.warning("database busy in %s, retrying in %.2fs", func.__name__, wait)

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            retrying = AsyncRetrying(
                stop=stop_after_attempt(attempts),
                wait=delay,
                retry=retry_if_exception(_is_transient),
                before_sleep=log,
                reraise=True,
            )
            try:
                return await retrying(func, *args, **kwargs)
            except (OperationalError, DBAPIError) as error:
                if not _is_transient(error):
                    raise
                raise DatabaseUnavailableError(
                    f"database unavailable after {attempts} attempts ({func.__name__}): {error.orig}"
                ) from error

        return wrapper

    return decorate


class Database:
    """Engines and sessions for one database URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.backend = make_url(url).get_backend_name()
        if self.backend == "sqlite":
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(async_url(url), echo=echo, pool_pre_ping=True)
        self._sync_engine: Engine | None = None
        if self.backend == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessionmaker = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)

    @property
    def sync_engine(self) -> Engine:
        """A synchronous engine on the same database (migrations, scripts)."""
        if self._sync_engine is None:
            self._sync_engine = create_engine(sync_url(self.url), pool_pre_ping=True)
            if self.backend == "sqlite":
                event.listen(self._sync_engine, "connect", _sqlite_pragmas)
        return self._sync_engine

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commits on success, rolls back on error."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def purge_deleted_pages(self) -> None:
        """Make deleted text leave the database files, as far as the backend allows.

        SQLite: deleted content is zeroed in place (``secure_delete``), but the write-ahead log still holds
        earlier images of those pages until a checkpoint; a ``TRUNCATE`` checkpoint copies them back and empties
        the log file. Best effort: a reader holding an old snapshot makes it partial, and the next call finishes
        the job. PostgreSQL: deleted rows stay in their pages until (auto)vacuum reclaims them; nothing to do
        from here (``VACUUM FULL`` forces it).
        """
        if self.backend != "sqlite":
            return
        try:
            async with self.engine.connect() as connection:
                await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except (OperationalError, DBAPIError) as error:
            logger.warning("could not truncate the SQLite write-ahead log after a deletion: %s", error)

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations (synchronously)."""
        from storage.migrate import upgrade

        upgrade(self.url, revision)

    async def create_schema(self) -> None:
        """Bring the schema to the latest migration without blocking the event loop."""
        await asyncio.to_thread(self.upgrade)

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        if self._sync_engine is not None:
            self._sync_engine.dispose()
