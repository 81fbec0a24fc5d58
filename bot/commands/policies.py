"""``reverie policies``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``policies`` to the CLI."""

    @app.command("policies")
    def policies() -> None:
        """Not implemented yet."""
        not_implemented("reverie policies")
