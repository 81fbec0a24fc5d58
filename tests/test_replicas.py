"""Two ``reverie serve`` replicas on one PostgreSQL database behind webhooks: the fake Bot API posts every update
to one of them (round robin, as a load balancer would), and one replica is SIGKILLed in the middle of the load.

Each replica is a process of its own (``python -m bot.cli serve``) with the tiny random policy; the users are
32 chats sending 3 messages each and waiting for each answer. Afterwards: every answer came once, every message
and answer is stored once, in order and in one conversation per chat, no update is left unconfirmed, and the
killed replica's updates were delivered again to the other one.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlmodel import col, select

from bot.adapters.telegram import APOLOGY
from bot.service import POLICY_APOLOGY, SHUTTING_DOWN, STORAGE_APOLOGY
from imagine.task import load_task
from storage import Conversation, Database, Role, Store, Turn
from tests.conftest import _truncate_postgres
from tests.fakes.ports import free_port
from tests.fakes.telegram_api import FakeTelegramServer

pytestmark = pytest.mark.postgres

TASK = load_task("travel")
CHATS = 32
MESSAGES = 3
SECRET = "replica-webhook-secret-5b1e"
WEBHOOK_URL = "https://bot.example.test/telegram/webhook"
APOLOGIES = {APOLOGY, POLICY_APOLOGY, STORAGE_APOLOGY, SHUTTING_DOWN}


async def _start_replica(env: dict[str, str], cwd: Path) -> tuple[asyncio.subprocess.Process, str]:
    """A ``reverie serve`` process; returns it and its base URL once ``/readyz`` answers 200."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "serve", env={**env, "HTTP_PORT": str(port)}, cwd=cwd,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        while process.returncode is None:  # the test's timeout bounds the wait
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return process, base_url
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"replica exited with {process.returncode} before it was ready")


async def _turns_by_chat(store: Store) -> dict[str, list[Turn]]:
    """Every stored turn of every real conversation, by chat, in the order they were stored."""
    async with store.database.session() as session:
        conversations = (await session.exec(select(Conversation).where(Conversation.source == "real"))).all()
        chat_of = {conversation.id: conversation.chat_key for conversation in conversations}
        turns = (
            await session.exec(select(Turn).where(col(Turn.conversation_id).in_(chat_of)).order_by(col(Turn.id)))
        ).all()
    by_chat: dict[str, list[Turn]] = {}
    for turn in turns:
        by_chat.setdefault(chat_of[turn.conversation_id], []).append(turn)
    return by_chat


async def test_two_webhook_replicas_answer_every_update_once_even_when_one_is_killed(
    postgres_url: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(_truncate_postgres, postgres_url)
    async with FakeTelegramServer() as server:
        env = {
            **os.environ,
            "DATABASE_URL": postgres_url,
            "TELEGRAM_TOKEN": server.token,
            "TELEGRAM_BASE_URL": server.base_url,
            "TELEGRAM_WEBHOOK_URL": WEBHOOK_URL,
            "TELEGRAM_WEBHOOK_SECRET": SECRET,
            "HTTP_HOST": "127.0.0.1",
            "BASE_MODEL": "tiny",
            "MAX_NEW_TOKENS": "8",
            "TORCH_THREADS": "1",
            "IMPROVE_ENABLED": "false",
            "LOG_LEVEL": "WARNING",
        }
        replicas = []
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            replicas.append(await _start_replica({**env, "DATA_DIR": str(tmp_path / name)}, tmp_path / name))
        (first, first_url), (second, second_url) = replicas
        server.webhook_targets = [first_url, second_url]
        answers: dict[int, list[str]] = {}

        async def user(number: int) -> None:
            chat = 5000 + number
            answers[chat] = []
            for index in range(MESSAGES):
                await server.send_text(chat, chat, f"chat {number} message {index}")
                while True:  # the opening line comes before the first answer of a conversation
                    message = await server.next_message(chat, timeout=120)
                    if message["text"] != TASK.opening_line:
                        break
                assert message["text"] not in APOLOGIES
                answers[chat].append(message["text"])

        def chat_of(update_id: int) -> int:
            return int(server.updates_by_id[update_id]["message"]["chat"]["id"])

        def first_replica_stuck_sending() -> bool:
            """Every update the first replica has in hand is handled (user turn and reply stored) and waits for its
            answer to go out, none sent but unconfirmed: killing it now leaves those updates stored but unanswered
            and unconfirmed — the case a redelivery must neither drop nor duplicate."""
            waiting = {int(call.params["chat_id"]) for call in server.held}
            latest: dict[int, int] = {}
            for update_id in server.updates_by_id:
                latest[chat_of(update_id)] = max(update_id, latest.get(chat_of(update_id), 0))
            on_first = [u for u, target in server.in_flight.items() if target == first_url]
            return bool(on_first) and all(chat_of(u) in waiting and latest[chat_of(u)] == u for u in on_first)

        try:
            users = [asyncio.create_task(user(number)) for number in range(CHATS)]
            await server.wait_until(lambda: len(server.sent_messages) >= CHATS)  # well into the load
            server.hold("sendMessage")
            await server.wait_until(first_replica_stuck_sending)
            on_first = {chat_of(u) for u, target in server.in_flight.items() if target == first_url}
            first.kill()  # SIGKILL: nothing of the replica's own clean-up runs
            await first.wait()
            # Its calls waiting at the gate never reach Telegram: wait until the fake has seen their connections go.
            while any(server.held_connected(c) for c in server.held if int(c.params["chat_id"]) in on_first):
                await asyncio.sleep(0.01)
            server.release()
            await asyncio.gather(*users)
            await server.wait_confirmed()
            async with httpx.AsyncClient(base_url=second_url) as client:
                metrics = (await client.get("/metrics")).text
        finally:
            for process in (first, second):
                if process.returncode is None:
                    process.terminate()
            for process in (first, second):
                await process.wait()

    assert second.returncode == 0  # SIGTERM: a graceful stop
    assert server.pending_updates() == 0  # nothing lost
    # The killed replica's updates were delivered again, and the other replica confirmed every one.
    failed = {d.update_id for d in server.deliveries if d.target == first_url and d.status != 200}
    assert failed
    confirmed = {d.update_id for d in server.deliveries if d.status == 200}
    assert confirmed == set(server.updates_by_id)
    assert {d.target for d in server.deliveries if d.update_id in failed and d.status == 200} == {second_url}
    assert 'reverie_handled_total{kind="message",platform="telegram"}' in metrics

    database = Database(postgres_url)
    try:
        turns = await _turns_by_chat(Store(database))
    finally:
        await database.dispose()
    assert len(turns) == CHATS
    for number in range(CHATS):
        chat = 5000 + number
        stored = turns[f"telegram:{chat}"]
        # one conversation, though consecutive messages landed on different replicas
        assert len({turn.conversation_id for turn in stored}) == 1
        said = [turn.text for turn in stored if turn.role == Role.USER]
        assert said == [f"chat {number} message {index}" for index in range(MESSAGES)]  # each once, in order
        replies = [turn.text for turn in stored if turn.role == Role.AGENT and turn.text != TASK.opening_line]
        assert replies == answers[chat]  # each answer stored once, and the one the user got
        sent = [m["text"] for m in server.messages_to(chat) if m["text"] != TASK.opening_line]
        assert Counter(sent) == Counter(answers[chat])  # every answer reached the user exactly once
        assert len(sent) == MESSAGES
