"""``reverie serve``."""

from __future__ import annotations

import typer

from bot.commands import not_implemented


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the CLI."""

    @app.command("serve")
    def serve() -> None:
        """Not implemented yet."""
        not_implemented("reverie serve")
