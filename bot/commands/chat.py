"""``reverie chat``: talk to the bot in the terminal (the same service and commands as on the platforms)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import typer

from bot.commands import console
from bot.context import configure_logging
from bot.settings import Settings


async def chat_in_terminal(settings: Settings) -> None:
    """Open the serving stack (no platforms, no improvement loop) and chat until end of input or Ctrl-C."""
    from bot import server
    from bot.adapters.console import run_console

    stop = asyncio.Event()
    with server.stop_on_signals(stop):
        async with contextlib.AsyncExitStack() as stack:
            with console.status("loading the policy…", spinner="dots"):
                runtime = await stack.enter_async_context(server.open_runtime(settings))
            await run_console(runtime.service, stop)


def register(app: typer.Typer) -> None:
    """Add ``chat`` to the CLI."""

    @app.command("chat")
    def chat() -> None:
        """Chat with Reverie in the terminal: `+`/`-` rate the last reply, /help lists commands, Ctrl-D leaves.

        Piped input works too (`printf 'hi\\n/end good\\n' | reverie chat`). You are console:$USER, an admin
        if ADMIN_IDS lists console:$USER.
        """
        settings = Settings()
        # Chat output goes to the terminal; only warnings are worth interleaving with it.
        configure_logging(settings.log_level if settings.log_level.upper() == "DEBUG" else "WARNING")
        try:
            asyncio.run(chat_in_terminal(settings))
        except Exception as error:  # a clear message and a non-zero exit rather than a traceback wall
            logging.getLogger(__name__).debug("chat failed", exc_info=True)
            console.print(f"[red]reverie chat: {error}[/red]")
            raise typer.Exit(code=1) from error
