"""``reverie db``: schema migrations."""

from __future__ import annotations

import typer

from bot.commands import console
from bot.settings import Settings
from storage import migrate as migrations
from storage import redacted

db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)


@db_app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Migrate the configured database up to REVISION (default: the latest)."""
    settings = Settings()
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(url, revision)
    console.print(f"database {redacted(url)} at revision {migrations.current(url)}")


@db_app.command("current")
def current() -> None:
    """Print the revision the configured database is at."""
    url = Settings().resolved_database_url
    typer.echo(migrations.current(url) or "empty")


@db_app.command("revision")
def revision(message: str = typer.Option(..., "-m", "--message", help="What the migration changes.")) -> None:
    """Autogenerate a migration from the models (for developers changing storage/models.py)."""
    migrations.revision(Settings().resolved_database_url, message)


def register(app: typer.Typer) -> None:
    """Add ``db`` to the CLI."""
    app.add_typer(db_app, name="db")
