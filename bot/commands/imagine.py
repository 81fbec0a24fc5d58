"""``reverie imagine``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``imagine`` to the CLI."""

    @app.command("imagine")
    def imagine() -> None:
        """Not implemented yet."""
        not_implemented("reverie imagine")
