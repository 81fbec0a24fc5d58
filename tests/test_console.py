"""The terminal adapter and ``reverie chat`` / ``reverie serve`` with piped stdin."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy.exc import OperationalError
from sqlmodel import select
from typer.testing import CliRunner

from bot.adapters.console import ConsoleChat, console_chat, run_console
from bot.cli import app
from bot.policy_holder import PolicyHolder
from bot.server import serve
from bot.service import DialogueService
from bot.settings import Settings
from imagine.task import load_task
from learning.interface import History
from storage import Conversation, Database, Feedback, Store, Turn

TASK = load_task("travel")


class EchoPolicy:
    """Replies with the user's last words."""

    name = "echo"
    version_id = None

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        return [f"echo: {history[-1].text}" for history in histories]

    async def respond(self, history: History) -> str:
        return self.respond_batch([history])[0]

    def close(self) -> None:
        pass


def make_chat(store: Store, lines: str, monkeypatch: pytest.MonkeyPatch) -> tuple[ConsoleChat, io.StringIO]:
    monkeypatch.setenv("USER", "tester")
    settings = Settings(_env_file=None, admin_ids=["console:tester"])
    service = DialogueService(store=store, policies=PolicyHolder(EchoPolicy()), task=TASK, settings=settings)
    output = io.StringIO()
    chat = ConsoleChat(service, input_stream=io.StringIO(lines), console=Console(file=output, width=200))
    return chat, output


async def all_rows(store: Store, model: type) -> list:
    async with store.database.session() as session:
        return list((await session.exec(select(model))).all())


async def test_piped_conversation_with_thumbs_and_commands(sqlite_store: Store, monkeypatch) -> None:
    chat, output = make_chat(sqlite_store, "-\nhello there\n+\n\nsecond\n-\n/status\n/bogus\n/end good\n", monkeypatch)
    assert not chat.interactive
    await chat.run()
    text = output.getvalue()
    assert "Nothing to rate yet." in text
    assert f"reverie> {TASK.opening_line}" in text and "reverie> echo: hello there" in text
    assert "Thanks for the 👍" in text and "Thanks for the 👎" in text
    assert "Active policy: echo" in text  # console:tester is an admin
    assert "/bogus" in text and "/help" in text
    conversation = (await all_rows(sqlite_store, Conversation))[0]
    assert (conversation.platform, conversation.user_key, conversation.reward) == ("console", "console:tester", 1.0)
    turns = await all_rows(sqlite_store, Turn)
    assert [t.text for t in turns] == [TASK.opening_line, "hello there", "echo: hello there", "second", "echo: second"]
    thumbs = sorted((f.turn_id, f.value) for f in await all_rows(sqlite_store, Feedback))
    assert thumbs == [(turns[2].id, 1.0), (turns[4].id, -1.0)]


async def test_quit_stops_reading_and_stop_event_ends_a_waiting_chat(sqlite_store: Store, monkeypatch) -> None:
    chat, output = make_chat(sqlite_store, "hi\n/quit\nnever read\n", monkeypatch)
    await chat.run()
    assert "never read" not in output.getvalue()
    assert len(await all_rows(sqlite_store, Turn)) == 3

    read_end, write_end = os.pipe()  # a pipe nobody writes to: the read blocks like an idle terminal
    with open(read_end) as idle_input, open(write_end, "w"):
        service = chat.service
        stop = asyncio.Event()
        waiting = asyncio.create_task(run_console(service, stop, input_stream=idle_input, console=Console(file=output)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        stop.set()
        await asyncio.wait_for(waiting, 5)


def test_console_user_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("USER", "ada")
    assert console_chat().user_key == "console:ada"
    monkeypatch.setenv("USER", "")
    assert console_chat().user_id  # falls back to the login name or "local"


@pytest.fixture
def tiny_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for the real CLI: tiny random model, a fresh data directory, no platform tokens."""
    env = {
        "BASE_MODEL": "tiny",
        "DATA_DIR": str(tmp_path / "data"),
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "4",
        "USER": "piper",
        "TELEGRAM_TOKEN": "",  # as copied from .env.example: means off
        "DISCORD_TOKEN": "",
        "ADMIN_IDS": "",
        "IMPROVE_ENABLED": "false",
    }
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return env


def test_reverie_chat_with_piped_stdin_exits_zero_at_eof(tiny_env: dict[str, str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["chat"], input="hello\n+\n/rate 5\n", env=tiny_env)
    assert result.exit_code == 0, result.output
    assert TASK.opening_line in result.output and "5/5" in result.output and "👍" in result.output
    assert (tmp_path / "data" / "reverie.db").is_file()


async def test_serve_without_tokens_chats_in_the_terminal_and_stops_on_sigterm(
    tiny_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in tiny_env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    read_end, write_end = os.pipe()
    with open(read_end) as stdin, open(write_end, "w") as user:
        monkeypatch.setattr(sys, "stdin", stdin)
        serving = asyncio.create_task(serve(settings))
        user.write("/start\nhello\n")
        user.flush()
        database = Database(settings.resolved_database_url)
        store = Store(database)
        turns: list[Turn] = []
        for _ in range(600):  # until the reply to "hello" is logged (the schema appears once serve starts)
            with contextlib.suppress(OperationalError):
                turns = await all_rows(store, Turn)
            if len(turns) == 3 or serving.done():
                break
            await asyncio.sleep(0.05)
        assert [t.role for t in turns] == ["agent", "user", "agent"]
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 30)
        conversation = only(await all_rows(store, Conversation))
        assert conversation.status == "open"  # kept open, to resume after the restart
        await database.dispose()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # our handler is gone again


def only(items: list) -> object:
    assert len(items) == 1, items
    return items[0]
