"""The Discord adapter through the real discord.py client against a wire-level fake of Discord.

Real parts throughout: discord.py's HTTP client and gateway websocket, the adapter, DialogueService, a Store on
SQLite and a policy; only Discord itself is the fake in ``tests/fakes/discord_gateway.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import discord.http
import pytest
from pydantic import SecretStr
from sqlmodel import select

from bot.adapters.discord import SEND_FAILED_TEXT, STALE_COMMAND_TEXT, outgoing_messages, run_discord
from bot.events import Reply, encode_feedback
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from imagine.task import load_task
from learning.policy import LearnedPolicy, load_policy
from storage import Conversation, Feedback, Role, Store
from tests.fakes.discord_gateway import (
    CALLBACK_DEFERRED_MESSAGE,
    CALLBACK_MESSAGE,
    MESSAGE_CONTENT_INTENT,
    FakeDiscord,
    FakeUser,
    custom_ids,
    is_ephemeral,
)

TASK = load_task("travel")
ALICE = FakeUser(501, "alice")
BOB = FakeUser(502, "bob")
ADMIN = FakeUser(42, "root")
GUILD_MESSAGES_INTENT, DIRECT_MESSAGES_INTENT = 1 << 9, 1 << 12


@pytest.fixture
def tiny_policy() -> Iterator[LearnedPolicy]:
    """The prompted base policy on the tiny random model; short replies keep the tests fast."""
    policy = load_policy("base", task=TASK, base_model="tiny", max_new_tokens=6)
    yield policy
    policy.close()


@asynccontextmanager
async def running_bot(
    fake: FakeDiscord,
    store: Store,
    policy: LearnedPolicy,
    tmp_path: Path,
    *,
    guild: bool = True,
    defer_after_s: float = 2.0,
    session: int = 1,
) -> AsyncIterator[DialogueService]:
    """The real service served by ``run_discord`` against ``fake``, connected and with commands synced."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        discord_token=SecretStr(fake.token),
        discord_guild_id=fake.guild_id if guild else None,
        admin_ids=[f"discord:{ADMIN.id}"],
    )
    holder = PolicyHolder(policy)
    service = DialogueService(store=store, policies=holder, task=TASK, settings=settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_discord(service, settings, stop, defer_after_s=defer_after_s))
    try:
        await fake.wait_until_ready(fake.guild_id if guild else None, session=session)
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
        await service.shutdown()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


async def conversations_of(store: Store, user: FakeUser) -> list[Conversation]:
    async with store.database.session() as session:
        query = select(Conversation).where(Conversation.user_key == f"discord:{user.id}")
        return list((await session.exec(query)).all())


async def all_feedback(store: Store) -> list[Feedback]:
    async with store.database.session() as session:
        return list((await session.exec(select(Feedback))).all())


async def agent_turn_ids(store: Store, conversation_id: int) -> list[int]:
    return [turn.id for turn in await store.get_turns(conversation_id) if turn.role == Role.AGENT]


async def logged(caplog: pytest.LogCaptureFixture, text: str, *, times: int = 1) -> None:
    """Return once ``text`` was logged ``times`` times (nothing on the wire to wait for instead)."""
    while caplog.text.count(text) < times:
        await asyncio.sleep(0.02)


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


async def test_conversation_with_slash_commands_mention_button_and_end(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path) as service:
        # Connected without the privileged intent, commands synced to the configured guild only.
        assert fake.identify is not None
        intents = int(fake.identify["intents"])
        assert not intents & MESSAGE_CONTENT_INTENT
        assert intents & GUILD_MESSAGES_INTENT and intents & DIRECT_MESSAGES_INTENT
        sync = only(fake.calls_to("PUT", rf"/applications/{fake.application_id}/guilds/{fake.guild_id}/commands"))
        assert sorted(command["name"] for command in sync.body) == sorted(c.name for c in service.commands)
        assert not fake.calls_to("PUT", rf"/applications/{fake.application_id}/commands")
        by_name = {command["name"]: command for command in sync.body}
        [score] = by_name["rate"]["options"]
        assert (score["type"], score["min_value"], score["max_value"], score["required"]) == (4, 1, 5, True)
        [verdict] = by_name["end"]["options"]
        assert [choice["value"] for choice in verdict["choices"]] == ["good", "bad"] and not verdict["required"]
        [text] = by_name["feedback"]["options"]
        assert (text["type"], text["required"]) == (3, True) and by_name["start"]["options"] == []

        # /start: the opening line, public, with 👍/👎 for its stored turn.
        start = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "start"))
        opening = only(start.visible())
        assert opening["content"] == TASK.opening_line and not is_ephemeral(opening)
        conversation = only(await conversations_of(sqlite_store, ALICE))
        opening_turn = only(await agent_turn_ids(sqlite_store, conversation.id))
        assert custom_ids(opening) == [encode_feedback(opening_turn, True), encode_feedback(opening_turn, False)]

        # A mention in the guild channel: typing, then the reply to the stored turn, text without the mention.
        asked = await fake.send_user_message(ALICE, "a quiet beach, please", mention_bot=True)
        [reply] = await fake.wait_for_channel_messages(fake.channel_id, 1)
        turns = await sqlite_store.get_turns(conversation.id)
        assert [(turn.role, turn.text) for turn in turns[1:2]] == [(Role.USER, "a quiet beach, please")]
        assert turns[2].role == Role.AGENT and reply["content"] == turns[2].text
        assert custom_ids(reply) == [encode_feedback(turns[2].id, True), encode_feedback(turns[2].id, False)]
        post = only(fake.calls_to("POST", rf"/channels/{fake.channel_id}/messages"))
        assert post.body["allowed_mentions"]["parse"] == []
        assert str(post.body["message_reference"]["message_id"]) == asked["id"]
        typing = fake.calls_to("POST", rf"/channels/{fake.channel_id}/typing")
        assert typing and fake.calls.index(typing[0]) < fake.calls.index(post)

        # 👍 on the reply: recorded on that turn, toast only for the clicker.
        click = await fake.wait_for_interaction(await fake.click_button(ALICE, reply, custom_ids(reply)[0]))
        toast = only(click.visible())
        assert toast["content"] == "Thanks for the 👍!" and is_ephemeral(toast)
        feedback = only(await all_feedback(sqlite_store))
        assert (feedback.turn_id, feedback.value, feedback.user_key) == (turns[2].id, 1.0, f"discord:{ALICE.id}")

        # /end good closes the episode with reward 1.
        end = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "end", {"choice": "good"}))
        assert "Glad it helped" in only(end.texts()) and is_ephemeral(end.visible()[0])
        ended = only(await conversations_of(sqlite_store, ALICE))
        assert (ended.reward, ended.reward_source) == (1.0, "end")

    assert not fake.unknown_calls and not fake.unauthorized_calls
    assert fake.token not in caplog.text


async def test_dm_answered_guild_message_without_mention_ignored_global_sync(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path
) -> None:
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path, guild=False) as service:
        sync = only(fake.calls_to("PUT", rf"/applications/{fake.application_id}/commands"))
        assert {command["name"] for command in sync.body} == {c.name for c in service.commands}
        assert not fake.calls_to("PUT", rf"/applications/{fake.application_id}/guilds/\d+/commands")

        # Without the message-content intent this arrives empty; either way it is not for the bot.
        await fake.send_user_message(BOB, "anyone around?")
        await fake.send_user_message(BOB, "hello there", dm=True)
        dm_channel = fake.dm_channel_id(BOB)
        opening, answer = await fake.wait_for_channel_messages(dm_channel, 2)
        conversation = only(await conversations_of(sqlite_store, BOB))
        turns = await sqlite_store.get_turns(conversation.id)
        assert [turn.text for turn in turns] == [TASK.opening_line, "hello there", answer["content"]]
        assert opening["content"] == TASK.opening_line
        assert "guild_id" not in answer and len(custom_ids(answer)) == 2
        assert fake.calls_to("POST", rf"/channels/{dm_channel}/typing")
        assert fake.channel_id not in fake.channel_messages
        assert not fake.calls_to("POST", rf"/channels/{fake.channel_id}/typing")

        # Global commands work in DMs; /help is only for the caller.
        help_log = await fake.wait_for_interaction(await fake.run_slash_command(BOB, "help", dm=True))
        assert "/end" in only(help_log.texts()) and is_ephemeral(help_log.visible()[0])
    assert not fake.unknown_calls


async def test_forget_admin_refusal_and_bad_buttons(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path
) -> None:
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path):
        start = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "start"))
        reply = only(start.visible())

        # Bob rates Alice's opening line: refused clearly, nothing recorded.
        foreign = await fake.wait_for_interaction(await fake.click_button(BOB, reply, custom_ids(reply)[1]))
        assert "own conversation" in only(foreign.texts()) and is_ephemeral(foreign.visible()[0])

        # Forged ids: not our pattern (no DynamicItem matches), and our pattern with a turn id out of range.
        for forged_id in ("fb:abc:up", "fb:1234567890123456789:up"):
            forged = dict(
                reply, components=[{"type": 1, "components": [{"type": 2, "style": 2, "custom_id": forged_id}]}]
            )
            log = await fake.wait_for_interaction(await fake.click_button(ALICE, forged, forged_id))
            assert "isn't one of mine" in only(log.texts()) and is_ephemeral(log.visible()[0])
        assert await all_feedback(sqlite_store) == []

        # A non-admin's /retrain is refused privately; an admin gets past the check.
        refused = await fake.wait_for_interaction(await fake.run_slash_command(BOB, "retrain"))
        assert "only for admins" in only(refused.texts()) and is_ephemeral(refused.visible()[0])
        allowed = await fake.wait_for_interaction(await fake.run_slash_command(ADMIN, "retrain"))
        assert "only for admins" not in only(allowed.texts())

        # /forget deletes Alice's conversation (and only hers).
        await fake.wait_for_interaction(await fake.run_slash_command(BOB, "start"))
        forget = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "forget"))
        assert "deleted 1 conversation" in only(forget.texts())
        assert await conversations_of(sqlite_store, ALICE) == []
        assert len(await conversations_of(sqlite_store, BOB)) == 1
    assert not fake.unknown_calls


async def test_feedback_buttons_work_after_a_restart(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path
) -> None:
    dm_channel = fake.dm_channel_id(ALICE)
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path):
        await fake.send_user_message(ALICE, "/start", dm=True)  # typed: DMs have no guild commands
        [reply] = await fake.wait_for_channel_messages(dm_channel, 1)
        assert reply["content"] == TASK.opening_line
    # A new process: nothing in memory knows that message, the custom id alone carries the vote.
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path, session=2):
        click = await fake.wait_for_interaction(await fake.click_button(ALICE, reply, custom_ids(reply)[1]))
        assert "👎" in only(click.texts()) and is_ephemeral(click.visible()[0])
    conversation = only(await conversations_of(sqlite_store, ALICE))
    feedback = only(await all_feedback(sqlite_store))
    assert (feedback.turn_id, feedback.value) == ((await agent_turn_ids(sqlite_store, conversation.id))[-1], -1.0)


async def test_slow_answers_are_deferred_then_followed_up(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path, defer_after_s=0.0):
        # Public answer: "thinking…" then the original response becomes the opening line with buttons.
        start = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "start"))
        assert start.callback_type == CALLBACK_DEFERRED_MESSAGE
        opening = only(start.visible())
        assert opening is start.original and opening["content"] == TASK.opening_line and len(custom_ids(opening)) == 2
        assert fake.calls_to("PATCH", rf"/webhooks/{fake.application_id}/{start.token}/messages/@original")

        # Private answer after a public "thinking…": the public placeholder goes, an ephemeral follow-up comes.
        rate = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "rate", {"score": 4}))
        assert rate.callback_type == CALLBACK_DEFERRED_MESSAGE and rate.original_deleted
        assert "4/5" in only(rate.texts()) and is_ephemeral(rate.visible()[0])
        conversation = only(await conversations_of(sqlite_store, ALICE))
        assert (conversation.reward, conversation.reward_source) == (0.75, "rating")

        # Several replies: the first one replaces "thinking…", the next one is a follow-up with its buttons.
        reset = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "reset"), messages=2)
        assert reset.texts() == ["There was nothing to reset; here's a fresh start.", TASK.opening_line]
        notice, fresh = reset.visible()
        assert notice is reset.original and custom_ids(notice) == []
        assert not is_ephemeral(fresh) and len(custom_ids(fresh)) == 2
        assert only(fake.calls_to("POST", rf"/webhooks/{fake.application_id}/{reset.token}")).body["components"]

        # A click deferred ephemerally: the toast replaces the private "thinking…".
        click = await fake.wait_for_interaction(await fake.click_button(ALICE, opening, custom_ids(opening)[1]))
        assert click.callback_type == CALLBACK_DEFERRED_MESSAGE and is_ephemeral(only(click.visible()))
        assert "👎" in only(click.texts())

        # Discord refuses the deferral (it arrived too late): the command still takes effect, the failure is logged.
        fake.fail_next(
            "POST", r"/interactions/\d+/[^/]+/callback", status=404, message="Unknown interaction", code=10062
        )
        end = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "end", {"choice": "good"}))
        assert end.callback_type == CALLBACK_MESSAGE and "Glad it helped" in only(end.texts())
        assert "could not defer interaction" in caplog.text
        latest = max(await conversations_of(sqlite_store, ALICE), key=lambda c: c.id)
        assert (latest.reward, latest.reward_source) == (1.0, "end")
    assert not fake.unknown_calls


async def test_stale_command_and_failed_send_are_answered_and_the_bot_goes_on(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path):
        # A command Discord still lists but this version no longer has (e.g. global commands lag an hour).
        stale = dict(fake.commands[fake.guild_id][0], name="teleport", id="1")
        fake.commands[fake.guild_id].append(stale)
        log = await fake.wait_for_interaction(await fake.run_slash_command(ALICE, "teleport"))
        assert only(log.texts()) == STALE_COMMAND_TEXT and is_ephemeral(log.visible()[0])

        # Discord refuses typing and the first reply: logged, apologised for, and the next message is answered.
        fake.fail_next("POST", rf"/channels/{fake.dm_channel_id(ALICE)}/typing")
        fake.fail_next("POST", rf"/channels/{fake.dm_channel_id(ALICE)}/messages")
        await fake.send_user_message(ALICE, "/start", dm=True)
        [apology] = await fake.wait_for_channel_messages(fake.dm_channel_id(ALICE), 1)
        assert apology["content"] == SEND_FAILED_TEXT
        assert "sending to channel" in caplog.text and "typing indicator refused" in caplog.text
        await fake.send_user_message(ALICE, "Lisbon?", dm=True)
        _, answer = await fake.wait_for_channel_messages(fake.dm_channel_id(ALICE), 2)
        conversation = only(await conversations_of(sqlite_store, ALICE))
        turns = await sqlite_store.get_turns(conversation.id)
        # The opening line was stored although it never arrived; the conversation went on from it.
        assert [turn.text for turn in turns[:2]] == [TASK.opening_line, "Lisbon?"]
        assert answer["content"] == turns[2].text and len(turns) == 3


async def test_stop_lets_the_reply_in_flight_finish(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path
) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, discord_token=SecretStr(fake.token))  # type: ignore[call-arg]
    holder = PolicyHolder(tiny_policy)
    service = DialogueService(store=sqlite_store, policies=holder, task=TASK, settings=settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_discord(service, settings, stop))
    await fake.wait_until_ready(None)
    await fake.send_user_message(BOB, "quick question", dm=True)
    await fake.wait_for(lambda: fake.calls_to("POST", r"/channels/\d+/typing"), what="typing")
    stop.set()
    await asyncio.wait_for(runner, 15)
    conversation = only(await conversations_of(sqlite_store, BOB))
    turns = await sqlite_store.get_turns(conversation.id)
    assert [turn.text for turn in turns][:2] == [TASK.opening_line, "quick question"] and len(turns) == 3
    assert [m["content"] for m in fake.channel_messages[fake.dm_channel_id(BOB)]] == [TASK.opening_line, turns[2].text]
    await service.shutdown()


async def test_rejected_token_turns_the_adapter_off_without_logging_it(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "WRONG-token-" + "B" * 40
    settings = Settings(_env_file=None, data_dir=tmp_path, discord_token=SecretStr(wrong))  # type: ignore[call-arg]
    holder = PolicyHolder(tiny_policy)
    service = DialogueService(store=sqlite_store, policies=holder, task=TASK, settings=settings)
    await asyncio.wait_for(run_discord(service, settings, asyncio.Event()), 15)
    assert "rejected the bot token" in caplog.text
    assert "WRONG-token" not in caplog.text
    assert fake.unauthorized_calls and fake.identify is None


async def test_no_token_means_discord_is_off(sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    holder = PolicyHolder(tiny_policy)
    service = DialogueService(store=sqlite_store, policies=holder, task=TASK, settings=settings)
    await asyncio.wait_for(run_discord(service, settings, asyncio.Event()), 5)  # returns instead of serving


def test_long_replies_are_split_with_buttons_on_the_last_piece_only() -> None:
    long_reply = Reply(text="a" * 1990 + "\n" + "b" * 2500, turn_id=7)
    notice = Reply(text="Saved.", private=True)
    messages = outgoing_messages([long_reply, notice])
    assert [len(m.text) for m in messages] == [1991, 2000, 500, 6]  # at the line break, then inside the word
    assert [m.turn_id for m in messages] == [None, None, 7, None]
    assert [m.private for m in messages] == [False, False, False, True]
    view = messages[2].view()
    assert view is not None and [item.custom_id for item in view.children] == ["fb:7:up", "fb:7:down"]


async def test_refused_command_sync_is_logged_and_messages_still_work(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A bot invited without the applications.commands scope may not register commands.
    pattern = rf"/applications/{fake.application_id}/guilds/{fake.guild_id}/commands"
    fake.fail_next("PUT", pattern, message="Missing Access", code=50001)
    async with running_bot(fake, sqlite_store, tiny_policy, tmp_path):
        assert fake.guild_id not in fake.commands
        assert "could not register slash commands" in caplog.text and "applications.commands" in caplog.text
        await fake.send_user_message(BOB, "/help", dm=True)
        [answer] = await fake.wait_for_channel_messages(fake.dm_channel_id(BOB), 1)
        assert "/feedback" in answer["content"]


async def test_unreachable_discord_is_retried_until_it_answers(
    fake: FakeDiscord, sqlite_store: Store, tiny_policy: LearnedPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    reachable = discord.http.Route.BASE
    discord.http.Route.BASE = f"http://127.0.0.1:{dead_port}/api/v10"
    settings = Settings(_env_file=None, data_dir=tmp_path, discord_token=SecretStr(fake.token))  # type: ignore[call-arg]
    service = DialogueService(store=sqlite_store, policies=PolicyHolder(tiny_policy), task=TASK, settings=settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_discord(service, settings, stop, retry_delay_s=0.05))
    try:
        await asyncio.wait_for(logged(caplog, "Discord unreachable", times=2), 15)
        discord.http.Route.BASE = reachable  # Discord is back
        await fake.wait_until_ready(None)
        assert fake.sessions == 1
    finally:
        discord.http.Route.BASE = reachable
        stop.set()
        await asyncio.wait_for(runner, 15)
