"""Telegram on webhooks: real python-telegram-bot and the real HTTP server (uvicorn) of the process, with the fake
Bot API posting updates to it as Telegram (and the load balancer in front of the replicas) would."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from bot.adapters.telegram import SECRET_HEADER, run_telegram, webhook_path
from bot.policy_holder import PolicyHolder
from bot.server import Runtime, http_server
from bot.settings import Settings
from bot.web.health import ADAPTERS
from bot.web.metrics import BotMetrics, MeteredDialogueService
from imagine.task import load_task
from learning.interface import History
from storage import Role, Store
from storage.models import Turn
from tests.fakes.ports import free_port
from tests.fakes.telegram_api import FakeTelegramServer

TASK = load_task("travel")
SECRET = "webhook-secret_0123456789"
WEBHOOK_URL = "https://bot.example.test/telegram/hook"
ALICE = 1001


class CountingPolicy:
    """Answers ``reply <n>`` (n counts the calls), so a second answer to one message would show."""

    def __init__(self) -> None:
        self.name = "counting"
        self.version_id: int | None = None
        self.calls = 0

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        raise NotImplementedError

    async def respond(self, history: History) -> str:
        self.calls += 1
        return f"reply {self.calls}"

    def close(self) -> None:
        pass


@pytest.fixture
async def replica(
    sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[FakeTelegramServer, Runtime]]:
    """One replica (HTTP server + webhook adapter) behind the fake Bot API; afterwards: no secret in the logs."""
    caplog.set_level(logging.DEBUG)
    ADAPTERS.__init__()  # type: ignore[misc]
    async with FakeTelegramServer() as server:
        settings = Settings(
            _env_file=None,
            telegram_token=server.token,
            telegram_base_url=server.base_url,
            telegram_webhook_url=WEBHOOK_URL,
            telegram_webhook_secret=SECRET,
            http_port=free_port(),
            http_host="127.0.0.1",
        )
        metrics = BotMetrics()
        policies = PolicyHolder(CountingPolicy())
        service = MeteredDialogueService(
            metrics=metrics, store=sqlite_store, policies=policies, task=TASK, settings=settings
        )
        runtime = Runtime(settings, sqlite_store, TASK, policies, service, lambda s, v: CountingPolicy(), metrics)
        server.webhook_targets = [f"http://127.0.0.1:{settings.http_port}"]
        stop = asyncio.Event()
        async with http_server(runtime, stop):
            ADAPTERS.expect("telegram")
            task = asyncio.create_task(run_telegram(service, settings, stop))
            await server.wait_for_call("setWebhook")
            try:
                yield server, runtime
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
                await service.shutdown()
    assert SECRET not in caplog.text
    assert server.token.split(":")[1] not in caplog.text


async def _user_turns(store: Store) -> list[Turn]:
    return [
        turn
        for conversation in await store.open_conversations()
        for turn in await store.get_turns(conversation.id or 0)
        if turn.role == Role.USER
    ]


async def test_updates_arrive_by_webhook_and_are_answered(replica: tuple[FakeTelegramServer, Runtime]) -> None:
    server, _ = replica
    (registered,) = server.calls_to("setWebhook")
    assert registered.params["url"] == WEBHOOK_URL and registered.params["secret_token"] == SECRET
    assert webhook_path(WEBHOOK_URL) == "/telegram/hook"

    await server.send_text(ALICE, ALICE, "hello")
    opening = await server.next_message(ALICE)
    answer = await server.next_message(ALICE)
    assert opening["text"] == TASK.opening_line and answer["text"] == "reply 1"
    await server.wait_confirmed()
    assert [d.status for d in server.deliveries] == [200]
    async with httpx.AsyncClient(base_url=server.webhook_targets[0]) as client:
        assert (await client.get("/readyz")).json()["adapters"] == {"telegram": True}


async def test_a_request_without_the_secret_token_is_refused(replica: tuple[FakeTelegramServer, Runtime]) -> None:
    server, runtime = replica
    update = {
        "update_id": 900,
        "message": {
            "message_id": 1, "date": 0, "chat": server.chat(ALICE), "from": server.user(ALICE), "text": "forged",
        },
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=server.webhook_targets[0]) as client:
        for headers in ({}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: SECRET[:-1]}):
            answer = await client.post("/telegram/hook", content=json.dumps(update), headers=headers)
            assert answer.status_code == 403
        assert (
            await client.post("/telegram/hook", content="not json", headers={SECRET_HEADER: SECRET})
        ).status_code == 400
    assert await _user_turns(runtime.store) == []
    assert server.sent_messages == []


async def test_a_redelivered_update_is_stored_and_answered_once(replica: tuple[FakeTelegramServer, Runtime]) -> None:
    server, runtime = replica
    message = await server.send_text(ALICE, ALICE, "to Rome")
    await server.next_message(ALICE)
    assert (await server.next_message(ALICE))["text"] == "reply 1"
    await server.wait_confirmed()
    (delivery,) = server.deliveries
    update = {"update_id": delivery.update_id, "message": message}
    # Telegram delivers it again (the replica died before its 200): nothing is stored or generated again; the
    # stored reply is sent again (with its buttons), since the dead replica may never have sent it.
    async with httpx.AsyncClient(base_url=server.webhook_targets[0]) as client:
        again = await client.post("/telegram/hook", content=json.dumps(update), headers={SECRET_HEADER: SECRET})
    assert again.status_code == 200
    resent = await server.next_message(ALICE)
    assert resent["text"] == "reply 1" and resent["reply_markup"] == server.messages_to(ALICE)[1]["reply_markup"]
    assert [turn.text for turn in await _user_turns(runtime.store)] == ["to Rome"]
    assert runtime.policies.active.calls == 1  # type: ignore[attr-defined]
    # The next message is a new update and is answered as usual.
    await server.send_text(ALICE, ALICE, "in May")
    assert (await server.next_message(ALICE))["text"] == "reply 2"
    assert [turn.text for turn in await _user_turns(runtime.store)] == ["to Rome", "in May"]
