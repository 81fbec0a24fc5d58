"""Shared set-up for CLI commands and the server: settings, logging, the database."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from rich.console import Console
from rich.logging import RichHandler

from bot import redaction
from bot.settings import Settings
from storage import Database, Store


def configure_logging(level: str = "INFO") -> None:
    """Rich console logging with secrets scrubbed from every record; third-party chatter kept at WARNING."""
    # Secrets from the environment and .env: a child step gets the server's secrets that way.
    try:
        settings: Settings | None = Settings()
    except Exception:  # invalid settings are reported by the command that loads them, not here
        settings = None
    redaction.protect(settings)
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        # stderr: stdout carries command output (e.g. `reverie dialogues export --out -`).
        handlers=[RichHandler(console=Console(stderr=True), rich_tracebacks=True, show_path=False)],
        force=True,
    )
    for noisy in ("httpx", "httpcore", "discord", "telegram", "apscheduler", "aiosqlite", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """A :class:`Store` on the configured database, migrated to the latest schema."""
    redaction.protect(settings)
    database = Database(settings.resolved_database_url)
    try:
        await database.create_schema()
        yield Store(database)
    finally:
        await database.dispose()
