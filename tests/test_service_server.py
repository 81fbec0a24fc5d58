"""The serving composition (bot.server): adapters' life cycle, the idle sweeper, policy loading at start-up."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest

from bot.events import ChatRef
from bot.policy_holder import PolicyHolder
from bot.server import expire_periodically, load_active_policy, run_adapters, serve
from bot.service import DialogueService
from bot.settings import Settings
from imagine.task import load_task
from learning.interface import History, Policy
from storage import ConversationStatus, Database, Store

TASK = load_task("travel")


class NamedPolicy:
    def __init__(self, name: str, version_id: int | None = None) -> None:
        self.name = name
        self.version_id = version_id

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        return [self.name for _ in histories]

    async def respond(self, history: History) -> str:
        await asyncio.sleep(0.05)
        return self.name

    def close(self) -> None:
        pass


def make_service(store: Store, **settings: object) -> DialogueService:
    return DialogueService(
        store=store,
        policies=PolicyHolder(NamedPolicy("p")),
        task=TASK,
        settings=Settings(_env_file=None, **settings),
    )


async def test_adapters_stop_together_and_finish_replies_in_flight(sqlite_store: Store) -> None:
    service = make_service(sqlite_store)
    events: list[str] = []

    async def rejected_token(service: DialogueService, settings: Settings, stop: asyncio.Event) -> None:
        raise PermissionError("token rejected")

    async def busy_platform(service: DialogueService, settings: Settings, stop: asyncio.Event) -> None:
        await stop.wait()
        # A message that arrived just before the stop: its reply is still produced and logged.
        replies = await service.handle_message(ChatRef("telegram", "1", "1"), "last words")
        events.append(replies[-1].text)

    stop = asyncio.Event()
    running = asyncio.create_task(
        run_adapters(service, service.settings, {"a": rejected_token, "b": busy_platform}, stop)
    )
    await asyncio.sleep(0.05)
    assert not running.done()  # one adapter failing does not stop the others
    stop.set()
    await asyncio.wait_for(running, 5)
    assert events == ["p"]


async def test_when_every_adapter_ends_the_server_stops(sqlite_store: Store) -> None:
    service = make_service(sqlite_store)

    async def gone(service: DialogueService, settings: Settings, stop: asyncio.Event) -> None:
        return None

    stop = asyncio.Event()
    await asyncio.wait_for(run_adapters(service, service.settings, {"x": gone, "y": gone}, stop), 5)
    assert stop.is_set()


async def test_the_sweeper_expires_idle_sessions_until_stopped(sqlite_store: Store) -> None:
    service = make_service(sqlite_store, session_idle_minutes=0.0001)  # 6 ms
    replies = await service.handle_message(ChatRef("discord", "1", "1"), "hi")
    stop = asyncio.Event()
    sweeper = asyncio.create_task(expire_periodically(service, stop, interval_s=0.02))
    conversation_id = (await sqlite_store.get_turn(replies[-1].turn_id)).conversation_id
    for _ in range(200):
        if (await sqlite_store.get_conversation(conversation_id)).status == ConversationStatus.EXPIRED:
            break
        await asyncio.sleep(0.02)
    assert (await sqlite_store.get_conversation(conversation_id)).status == ConversationStatus.EXPIRED
    stop.set()
    await asyncio.wait_for(sweeper, 5)


async def test_start_up_serves_the_active_checkpoint_or_falls_back_to_base(sqlite_store: Store, tmp_path: Path) -> None:
    calls: list[tuple[str, int | None]] = []

    def loader(source: str, version_id: int | None) -> Policy:
        calls.append((source, version_id))
        if source == str(tmp_path / "broken"):
            raise ValueError("hash mismatch")
        return NamedPolicy(source, version_id)

    assert (await load_active_policy(sqlite_store, loader)).name == "base"
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    good = await sqlite_store.register_policy_version(
        path=str(good_dir), sha256="0" * 64, base_model="t", algorithm="bc"
    )
    await sqlite_store.activate_policy_version(good.id)
    assert (await load_active_policy(sqlite_store, loader)).version_id == good.id
    (tmp_path / "broken").mkdir()
    for path in (tmp_path / "broken", tmp_path / "missing"):
        version = await sqlite_store.register_policy_version(
            path=str(path), sha256="1" * 64, base_model="t", algorithm="bc"
        )
        await sqlite_store.activate_policy_version(version.id)
        assert (await load_active_policy(sqlite_store, loader)).name == "base"
    assert calls == [
        ("base", None),
        (str(good_dir), good.id),
        (str(tmp_path / "broken"), good.id + 1),
        ("base", None),
        ("base", None),  # a missing directory is not even tried
    ]


async def test_serve_runs_telegram_from_settings_and_stops_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.telegram_api import FakeTelegramServer

    monkeypatch.chdir(tmp_path)
    async with FakeTelegramServer() as telegram:
        settings = Settings(
            _env_file=None,
            data_dir=tmp_path / "data",
            base_model="tiny",
            device="cpu",
            max_new_tokens=4,
            telegram_token=telegram.token,
            telegram_base_url=telegram.base_url,
            discord_token="",  # as copied from .env.example: off
        )
        serving = asyncio.create_task(serve(settings))
        await telegram.wait_for_call("getUpdates", timeout=60)
        await telegram.send_text(7, 7, "hello from telegram")
        opening = await telegram.next_message(7, timeout=60)
        reply = await telegram.next_message(7, timeout=60)
        assert opening["text"] == TASK.opening_line and reply["text"]
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 30)
    database = Database(settings.resolved_database_url)
    store = Store(database)
    [conversation] = await store.open_conversations()
    turns = await store.get_turns(conversation.id)
    assert (conversation.user_key, [t.role for t in turns]) == ("telegram:7", ["agent", "user", "agent"])
    assert turns[1].text == "hello from telegram" and turns[2].text == reply["text"]
    await database.dispose()
