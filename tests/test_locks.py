"""The trainer lock admits one holder across processes, on SQLite and PostgreSQL."""

from __future__ import annotations

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
