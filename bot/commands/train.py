"""``reverie train``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``train`` to the CLI."""

    @app.command("train")
    def train() -> None:
        """Not implemented yet."""
        not_implemented("reverie train")
