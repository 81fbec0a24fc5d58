"""The terminal adapter: the same :class:`~bot.service.DialogueService` and commands, in a shell.

Lines starting with ``/`` are commands, ``+`` / ``-`` rate the last reply (👍/👎), ``/quit`` or end of input
(Ctrl-D, or the end of piped stdin) leaves. The user is ``console:$USER``. Input is read on a daemon
thread, so a pending prompt never keeps the process alive after Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.text import Text

from bot.events import ChatRef, Reply, encode_feedback
from bot.service import DialogueService

PROMPT = "[bold cyan]you>[/] "
QUIT_COMMANDS = frozenset({"quit", "exit"})


def console_user() -> str:
    """The terminal user's name: ``$USER``, else the login name, else ``local``."""
    name = os.environ.get("USER", "").strip()
    if not name:
        with contextlib.suppress(Exception):
            name = getpass.getuser()
    return name or "local"


def console_chat(user: str | None = None) -> ChatRef:
    """The :class:`ChatRef` of a terminal session (one chat per user)."""
    user = user or console_user()
    return ChatRef(platform="console", chat_id=user, user_id=user, user_name=user)


class ConsoleChat:
    """One terminal conversation: reads lines, calls the service, prints replies."""

    def __init__(
        self, service: DialogueService, *, input_stream: TextIO | None = None, console: Console | None = None
    ) -> None:
        self.service = service
        self.input_stream = input_stream or sys.stdin
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.interactive = self.input_stream.isatty() and self.console.is_terminal
        self.chat = console_chat()
        self.last_turn_id: int | None = None
        self._hinted = False

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Chat until end of input, ``/quit``, or ``stop`` is set."""
        stop = stop or asyncio.Event()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            if self.interactive:
                self.console.print(
                    f"[bold]Reverie[/] - {self.service.task.title}. Type a message, /help for commands, "
                    "+ or - to rate my last reply, Ctrl-D to leave.",
                )
            while not stop.is_set():
                line_read = _read_in_daemon_thread(self._read_line)
                await asyncio.wait({line_read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not line_read.done():
                    break
                line = line_read.result()
                if line is None:
                    break
                if not await self.handle_line(line):
                    break
        finally:
            stopping.cancel()
        if self.interactive:
            minutes = self.service.settings.session_idle_minutes
            self.console.print(f"[dim]Bye! Come back within {minutes:g} minutes to continue this conversation.[/]")

    async def handle_line(self, line: str) -> bool:
        """Act on one input line; ``False`` means the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if line in ("+", "-"):
            await self._rate_last(line == "+")
        elif line.startswith("/"):
            name, _, argument = line[1:].partition(" ")
            if name.lower() in QUIT_COMMANDS:
                return False
            self._print(await self.service.handle_command(self.chat, name, argument))
        else:
            with self._thinking():
                replies = await self.service.handle_message(self.chat, line)
            self._print(replies)
        return True

    async def _rate_last(self, thumbs_up: bool) -> None:
        if self.last_turn_id is None:
            self.console.print("[dim]Nothing to rate yet.[/]")
            return
        toast = await self.service.handle_feedback(self.chat, encode_feedback(self.last_turn_id, thumbs_up))
        self.console.print(Text(toast, style="dim"))

    def _print(self, replies: list[Reply]) -> None:
        for reply in replies:
            if reply.turn_id is not None:
                self.last_turn_id = reply.turn_id
                self.console.print(Text.assemble(("reverie> ", "bold green"), reply.text))
                if not self._hinted and self.interactive:
                    self.console.print("[dim](+ / - rates this reply)[/]")
                    self._hinted = True
            else:
                self.console.print(Text(reply.text, style="red" if reply.is_error else "yellow"))

    def _read_line(self) -> str | None:
        if self.interactive:
            try:
                return self.console.input(PROMPT)
            except EOFError:
                return None
        line = self.input_stream.readline()
        return line if line else None

    def _thinking(self) -> contextlib.AbstractContextManager[object]:
        # A spinner stands in for the typing indicator; piped output stays clean.
        if self.interactive:
            return self.console.status("thinking…", spinner="dots")
        return contextlib.nullcontext()


def _read_in_daemon_thread(read: Callable[[], str | None]) -> asyncio.Future[str | None]:
    """Run a blocking read on a daemon thread (never joined at exit, unlike the default executor)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def deliver(value: str | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def work() -> None:
        value, error = None, None
        try:
            value = read()
        except (KeyboardInterrupt, EOFError):
            value = None
        except BaseException as caught:  # handed to the event loop, which re-raises it in run()
            error = caught
        with contextlib.suppress(RuntimeError):  # the loop may already be closed at exit
            loop.call_soon_threadsafe(deliver, value, error)

    threading.Thread(target=work, name="console-input", daemon=True).start()
    return future


async def run_console(
    service: DialogueService,
    stop: asyncio.Event | None = None,
    *,
    input_stream: TextIO | None = None,
    console: Console | None = None,
) -> None:
    """Chat with ``service`` in the terminal until end of input, ``/quit`` or ``stop``."""
    await ConsoleChat(service, input_stream=input_stream, console=console).run(stop)
