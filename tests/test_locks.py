"""The trainer lock admits one holder across processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from storage import Database
from storage.locks import TrainerLock


async def test_only_one_trainer_holds_the_lock(database: Database) -> None:
    # A second Database object is what another replica would have: its own engine and connections.
    other_replica = Database(database.url)
    try:
        first, second = TrainerLock(database), TrainerLock(other_replica)
        assert await first.acquire()
        assert not await second.acquire()
        assert not second.held
        await first.release()
        assert await second.acquire()
        assert not await first.acquire()
        await second.release()
        async with TrainerLock(database, name="another-job") as got:
            assert got  # differently named locks are independent
    finally:
        await other_replica.dispose()


async def test_release_without_holding_is_harmless(database: Database) -> None:
    lock = TrainerLock(database)
    await lock.release()
    assert await lock.acquire()
    await lock.release()
    await lock.release()


# --- a dropped connection (PostgreSQL) ----------------------------------------------------------------------


async def _terminate_lock_holders(url: str) -> int:
    """``pg_terminate_backend`` every session holding an advisory lock in this database (what a restarted
    server or a proxy's idle timeout does to the lock's connection)."""
    admin = Database(url)
    try:
        async with admin.engine.connect() as connection:
            result = await connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            )
            return len(result.all())
    finally:
        await admin.dispose()


@pytest.mark.postgres
async def test_a_dropped_lock_connection_is_replaced_and_the_lock_kept(postgres_url: str) -> None:
    holder, other_replica = Database(postgres_url), Database(postgres_url)
    try:
        lock = TrainerLock(holder, name="drop-kept", check_interval_s=None)
        assert await lock.acquire()
        assert await _terminate_lock_holders(postgres_url) == 1
        # The server released the lock with the connection: without the check, another replica gets it.
        assert await lock.check()  # the keeper's step: reconnect and take it again, before anyone else
        assert lock.reconnects == 1 and not lock.lost.is_set()
        assert not await TrainerLock(other_replica, name="drop-kept").acquire()
        await lock.release()
        second = TrainerLock(other_replica, name="drop-kept")
        assert await second.acquire()
        await second.release()
    finally:
        await holder.dispose()
        await other_replica.dispose()


@pytest.mark.postgres
async def test_a_lock_taken_by_another_replica_after_a_drop_stops_the_run(postgres_url: str) -> None:
    holder, other_replica = Database(postgres_url), Database(postgres_url)
    try:
        lock = TrainerLock(holder, name="drop-lost", check_interval_s=None)
        thief = TrainerLock(other_replica, name="drop-lost", check_interval_s=None)
        acquired = asyncio.Event()

        async def run() -> None:
            assert await lock.acquire()
            acquired.set()
            try:
                await asyncio.Event().wait()  # a long training run
            finally:
                await lock.release()

        running = asyncio.create_task(run())
        await acquired.wait()
        assert await _terminate_lock_holders(postgres_url) == 1
        assert await thief.acquire()  # the drop let another replica in
        assert not await lock.check()
        assert lock.lost.is_set()
        with pytest.raises(asyncio.CancelledError):
            await running  # the run stops instead of training beside the other one
        assert thief.held
        await thief.release()
    finally:
        await holder.dispose()
        await other_replica.dispose()


@pytest.mark.postgres
async def test_the_keeper_checks_by_itself(postgres_url: str) -> None:
    holder, other_replica = Database(postgres_url), Database(postgres_url)
    try:
        lock = TrainerLock(holder, name="drop-keeper", check_interval_s=0.05)
        assert await lock.acquire()
        assert await _terminate_lock_holders(postgres_url) == 1
        while lock.reconnects == 0:  # no timed assertion: the test's own timeout bounds the wait
            await asyncio.sleep(0.05)
        assert not await TrainerLock(other_replica, name="drop-keeper").acquire()
        await lock.release()
        assert not lock.held
    finally:
        await holder.dispose()
        await other_replica.dispose()
