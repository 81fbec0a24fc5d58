"""``reverie serve``: run the bot on every configured platform (or in the terminal when none is)."""

from __future__ import annotations

import asyncio
import logging

import typer

from bot.commands import console
from bot.context import configure_logging
from bot.settings import Settings


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the CLI."""

    @app.command("serve")
    def serve() -> None:
        """Serve Telegram and/or Discord (whichever token is set), else chat in the terminal.

        Stops gracefully on Ctrl-C or SIGTERM: replies in flight finish, open conversations are kept.
        """
        from bot import server

        settings = Settings()
        configure_logging(settings.log_level)
        try:
            asyncio.run(server.serve(settings, improver_hook=server.default_improver_hook()))
        except Exception as error:
            logging.getLogger(__name__).exception("reverie serve failed")
            console.print(f"[red]reverie serve: {error}[/red]")
            raise typer.Exit(code=1) from error
