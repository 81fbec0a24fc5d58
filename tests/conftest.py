"""Shared fixtures: a migrated database on SQLite and on PostgreSQL, tiny models, offline guards."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from storage import Database, Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_admin_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards.

    Skips where no server answers, except under CI (``CI=true``), where a missing server is a failure.
    """
    admin_url = _postgres_admin_url()
    sync_admin = make_url(admin_url).set(drivername="postgresql+psycopg")
    engine = create_engine(sync_admin, isolation_level="AUTOCOMMIT")
    name = f"reverie_test_{uuid.uuid4().hex[:10]}"
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        engine.dispose()
        message = f"no PostgreSQL server at {make_url(admin_url).render_as_string()}: {error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    url = sync_admin.set(database=name).render_as_string(hide_password=False)
    from storage.migrate import upgrade

    upgrade(url)
    yield url
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def _truncate_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "TRUNCATE conversation, turn, feedback, policyversion, trainingrun, datadeletion "
                "RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated, empty database: every test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'reverie.db'}")
        await db.create_schema()
    else:
        url = request.getfixturevalue("postgres_url")
        await asyncio.to_thread(_truncate_postgres, url)
        db = Database(url)
    yield db
    await db.dispose()


@pytest.fixture
async def sqlite_database(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated SQLite database, for tests that need only one backend."""
    db = Database(f"sqlite:///{tmp_path / 'reverie.db'}")
    await db.create_schema()
    yield db
    await db.dispose()


@pytest.fixture
async def store(database: Database) -> Store:
    """A :class:`Store` on each database backend."""
    return Store(database)


@pytest.fixture
async def sqlite_store(sqlite_database: Database) -> Store:
    """A :class:`Store` on SQLite only."""
    return Store(sqlite_database)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the bundled SmolLM2 is converted: shared across runs to pay the conversion once."""
    configured = os.environ.get("REVERIE_MODEL_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "reverie" / "models"
