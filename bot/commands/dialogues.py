"""``reverie dialogues``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``dialogues`` to the CLI."""

    @app.command("dialogues")
    def dialogues() -> None:
        """Not implemented yet."""
        not_implemented("reverie dialogues")
