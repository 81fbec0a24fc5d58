"""``reverie chat``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``chat`` to the CLI."""

    @app.command("chat")
    def chat() -> None:
        """Not implemented yet."""
        not_implemented("reverie chat")
