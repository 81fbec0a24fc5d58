"""``reverie eval``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the CLI."""

    @app.command("eval")
    def evaluate() -> None:
        """Not implemented yet."""
        not_implemented("reverie eval")
