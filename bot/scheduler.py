"""The improvement schedule: an APScheduler 3.x ``AsyncIOScheduler`` in the serving process.

Jobs live in the same database (SQLAlchemy job store), so a restart keeps the schedule and a missed run
is coalesced into one. One instance at a time; the trainer lock (``storage.locks``) keeps replicas from
training concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from storage.database import sync_url

logger = logging.getLogger(__name__)

JOB_ID = "reverie-improvement"

# The job store pickles a *reference* to the job function, so it must be a module-level function; it
# calls whatever the running process registered.
_improvement: Callable[[], Awaitable[object]] | None = None


class ScheduleError(ValueError):
    """The configured cron expression is not valid."""


async def scheduled_improvement() -> None:
    """The scheduled job: run the improvement registered by this process."""
    if _improvement is None:
        logger.warning("improvement job fired but no improvement loop is registered in this process")
        return
    await _improvement()


def parse_cron(expression: str) -> CronTrigger:
    """A UTC cron trigger from a five-field crontab expression."""
    try:
        return CronTrigger.from_crontab(expression, timezone=UTC)
    except ValueError as error:
        raise ScheduleError(f"IMPROVE_CRON={expression!r} is not a valid cron expression: {error}") from error


def start_scheduler(database_url: str, cron: str, improvement: Callable[[], Awaitable[object]]) -> AsyncIOScheduler:
    """Start the scheduler on the running event loop with one coalescing, single-instance job."""
    global _improvement
    trigger = parse_cron(cron)
    _improvement = improvement
    scheduler = AsyncIOScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=sync_url(database_url))},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 6 * 3600},
        timezone=UTC,
    )
    scheduler.add_job(scheduled_improvement, trigger, id=JOB_ID, name="improvement run", replace_existing=True)
    scheduler.start()
    job = scheduler.get_job(JOB_ID)
    logger.info("improvement runs scheduled (%s UTC), next at %s", cron, job.next_run_time if job else "?")
    return scheduler


def stop_scheduler(scheduler: AsyncIOScheduler) -> None:
    """Stop firing jobs (a run already going is cancelled by its owner)."""
    global _improvement
    if scheduler.running:
        scheduler.shutdown(wait=False)
    _improvement = None
