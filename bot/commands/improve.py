"""``reverie improve``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``improve`` to the CLI."""

    @app.command("improve")
    def improve() -> None:
        """Not implemented yet."""
        not_implemented("reverie improve")
