"""``reverie generate``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``generate`` to the CLI."""

    @app.command("generate")
    def generate() -> None:
        """Not implemented yet."""
        not_implemented("reverie generate")
