"""The improvement schedule persists in the database and fires the registered run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bot.scheduler import JOB_ID, ScheduleError, parse_cron, start_scheduler, stop_scheduler
from storage import Database


async def test_job_is_stored_and_fires(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reverie.db'}"
    database = Database(url)
    await database.create_schema()
    fired = asyncio.Event()

    async def improvement() -> None:
        fired.set()

    scheduler = start_scheduler(url, "0 3 * * *", improvement)
    try:
        job = scheduler.get_job(JOB_ID)
        assert (job.next_run_time.hour, job.next_run_time.minute) == (3, 0)
        engine = create_engine(f"sqlite:///{tmp_path / 'reverie.db'}")
        with engine.connect() as connection:
            assert connection.execute(text("select id from apscheduler_jobs")).scalars().all() == [JOB_ID]
        engine.dispose()
        scheduler.modify_job(JOB_ID, next_run_time=datetime.now(UTC))
        await asyncio.wait_for(fired.wait(), 10)
    finally:
        stop_scheduler(scheduler)
        await database.dispose()


async def test_restart_replaces_the_job_instead_of_duplicating(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'reverie.db'}"

    async def improvement() -> None:
        return None

    for cron in ("0 3 * * *", "30 4 * * 1"):
        scheduler = start_scheduler(url, cron, improvement)
        jobs = scheduler.get_jobs()
        stop_scheduler(scheduler)
    assert len(jobs) == 1 and jobs[0].next_run_time.minute == 30


def test_bad_cron_is_a_clear_error() -> None:
    with pytest.raises(ScheduleError, match="IMPROVE_CRON"):
        parse_cron("every night")
