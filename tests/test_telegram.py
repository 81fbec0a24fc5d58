"""The Telegram adapter end to end: real python-telegram-bot against a fake Bot API server on 127.0.0.1,
a real :class:`DialogueService` on SQLite and a real (tiny, random) policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import torch
from sqlmodel import select

from bot.adapters.telegram import APOLOGY, CHOSEN_MARK, TEXT_ONLY, run_telegram
from bot.events import decode_feedback, encode_feedback
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from imagine.task import load_task
from learning.interface import Policy
from learning.policy import load_policy
from storage import Store
from storage.models import Conversation, Feedback, Turn
from tests.fakes.telegram_api import FakeTelegramServer

ADMIN_ID = 4242
ALICE, BOB = 1001, 1002
GROUP = -5001


@dataclass
class Harness:
    """A running bot: the fake server (the users' side), the service and its store."""

    server: FakeTelegramServer
    service: DialogueService
    store: Store
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shut_down(self) -> None:
        """Stop the adapter and wait until it has stopped."""
        self.stop.set()
        await asyncio.wait_for(self.task, 30)

    async def turns(self, user_id: int, chat_id: int | None = None) -> list[Turn]:
        """Every stored turn of ``user_id``'s conversations (optionally in one chat), in order."""
        async with self.store.database.session() as session:
            query = select(Conversation).where(Conversation.user_key == f"telegram:{user_id}")
            if chat_id is not None:
                query = query.where(Conversation.chat_key == f"telegram:{chat_id}")
            conversations = (await session.exec(query.order_by(Conversation.id))).all()
        return [turn for c in conversations for turn in await self.store.get_turns(c.id)]

    async def feedback(self) -> list[Feedback]:
        """Every stored feedback row."""
        async with self.store.database.session() as session:
            return list((await session.exec(select(Feedback))).all())


@pytest.fixture(scope="module")
def tiny_policy() -> Iterator[Policy]:
    """The prompted base policy on the tiny random model with short replies; one per module (serves any loop)."""
    threads = torch.get_num_threads()
    # One thread: a 64-wide model gains nothing from two, and spinning threads crawl on a busy 2-core machine.
    torch.set_num_threads(1)
    policy = load_policy("base", task=load_task("travel"), base_model="tiny", max_new_tokens=12)
    yield policy
    policy.close()
    torch.set_num_threads(threads)


@pytest.fixture
async def harness(sqlite_store: Store, tiny_policy: Policy, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Harness]:
    """The bot polling the fake server; afterwards checks that the token never reached a log line."""
    for name in (None, "httpx", "telegram"):  # httpx logs every request URL, which holds the token
        caplog.set_level(logging.DEBUG, logger=name)
    async with FakeTelegramServer() as server:
        settings = Settings(
            _env_file=None,
            telegram_token=server.token,
            telegram_base_url=server.base_url,
            admin_ids=[f"telegram:{ADMIN_ID}"],
        )
        service = DialogueService(
            store=sqlite_store, policies=PolicyHolder(tiny_policy), task=load_task("travel"), settings=settings
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_telegram(service, settings, stop, poll_timeout_s=5))
        await server.wait_for_call("getUpdates", timeout=30)
        harness = Harness(server, service, sqlite_store, stop, task)
        try:
            yield harness
        finally:
            if not task.done():
                await harness.shut_down()
            await service.shutdown()
    # Teardown's own records are in caplog.text; the test's are kept per phase.
    logged = caplog.text + "".join(r.getMessage() for phase in ("setup", "call") for r in caplog.get_records(phase))
    assert server.token.split(":")[1] not in logged


def buttons(message: dict) -> list[tuple[str, str]]:
    """``(label, callback_data)`` of a message's inline keyboard."""
    rows = message.get("reply_markup", {}).get("inline_keyboard", [])
    return [(button["text"], button["callback_data"]) for row in rows for button in row]


async def test_full_conversation_logs_turns_feedback_and_reward(harness: Harness) -> None:
    server = harness.server
    await server.send_command(ALICE, ALICE, "start")
    opening = await server.next_message(ALICE)
    assert opening["text"] == load_task("travel").opening_line
    opening_turn = decode_feedback(buttons(opening)[0][1])[0]
    assert buttons(opening) == [
        ("👍", encode_feedback(opening_turn, True)),
        ("👎", encode_feedback(opening_turn, False)),
    ]

    user_texts = ["I want a quiet beach trip.", "Two weeks in June, mid budget."]
    replies = []
    for text in user_texts:
        await server.send_text(ALICE, ALICE, text)
        replies.append(await server.next_message(ALICE))
    for reply in replies:
        assert reply["text"].strip()
        assert [label for label, _ in buttons(reply)] == ["👍", "👎"]

    # Typing is shown before each generated reply.
    calls = [(c.method, c.params.get("chat_id")) for c in server.calls]
    first_reply_at = next(
        i
        for i, c in enumerate(server.calls)
        if c.method == "sendMessage" and c.params.get("text") == replies[0]["text"]
    )
    assert ("sendChatAction", str(ALICE)) in calls[:first_reply_at]
    assert all(c.params["action"] == "typing" for c in server.calls_to("sendChatAction"))

    # 👍 on the last reply: toast, button marked, feedback stored on that turn.
    up = buttons(replies[-1])[0][1]
    query_id = await server.press_button(ALICE, ALICE, replies[-1], up)
    answer = await server.wait_for_call("answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id)
    assert "👍" in answer.params["text"]
    edit = await server.wait_for_call("editMessageReplyMarkup")
    assert edit.params["message_id"] == str(replies[-1]["message_id"])
    assert [label for label, _ in buttons(server.message(ALICE, replies[-1]["message_id"]))] == [
        "👍" + CHOSEN_MARK,
        "👎",
    ]

    await server.send_command(ALICE, ALICE, "end", "good")
    ended = await server.next_message(ALICE)
    assert "ended" in ended["text"].lower()
    assert buttons(ended) == []

    turns = await harness.turns(ALICE)
    assert [t.role for t in turns] == ["agent", "user", "agent", "user", "agent"]
    assert [t.text for t in turns if t.role == "user"] == user_texts
    assert [t.text for t in turns if t.role == "agent"][1:] == [r["text"] for r in replies]
    conversation = await harness.store.get_conversation(turns[0].conversation_id)
    assert conversation is not None
    assert (conversation.reward, conversation.reward_source, conversation.platform) == (1.0, "end", "telegram")
    feedback = await harness.feedback()
    assert [(f.turn_id, f.value, f.user_key) for f in feedback] == [(decode_feedback(up)[0], 1.0, f"telegram:{ALICE}")]
    assert turns[-1].id == decode_feedback(up)[0]


async def test_commands_are_registered_for_everyone_and_admins(harness: Harness) -> None:
    public = [c.name for c in harness.service.commands if not c.admin_only]
    everything = [c.name for c in harness.service.commands]
    assert "retrain" in everything and "retrain" not in public
    registered = harness.server.commands_by_scope
    assert [c["command"] for c in registered['{"type": "default"}']] == public
    assert [c["command"] for c in registered[f'{{"chat_id": {ADMIN_ID}, "type": "chat"}}']] == everything
    end = next(c for c in registered['{"type": "default"}'] if c["command"] == "end")
    assert "good|bad" in end["description"]


async def test_forget_deletes_only_the_callers_data(harness: Harness) -> None:
    server = harness.server
    for user in (ALICE, BOB):
        await server.send_text(user, user, "Somewhere warm, please.")
        await server.next_message(user)  # opening line
        await server.next_message(user)  # reply
    alice_reply = server.messages_to(ALICE)[-1]
    assert len(await harness.turns(ALICE)) == 3

    await server.send_command(ALICE, ALICE, "forget")
    done = await server.next_message(ALICE)
    assert "deleted 1 conversation" in done["text"]
    assert await harness.turns(ALICE) == []
    assert len(await harness.turns(BOB)) == 3

    # An old button of the forgotten conversation records nothing.
    query_id = await server.press_button(ALICE, ALICE, alice_reply, buttons(alice_reply)[0][1])
    answer = await server.wait_for_call("answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id)
    assert "nothing was recorded" in answer.params["text"]
    assert await harness.feedback() == []


async def test_admin_commands_refused_to_others(harness: Harness) -> None:
    server = harness.server
    await server.send_command(BOB, BOB, "retrain")
    refused = await server.next_message(BOB)
    assert "only for admins" in refused["text"]
    await server.send_command(ADMIN_ID, ADMIN_ID, "retrain")
    admin_answer = await server.next_message(ADMIN_ID)
    assert "only for admins" not in admin_answer["text"]
    assert "improvement loop" in admin_answer["text"].lower()


async def test_bad_input_gets_a_clear_answer_and_loses_nothing(harness: Harness) -> None:
    server = harness.server
    await server.send_text(ALICE, ALICE, "   \t  ")
    assert "empty" in (await server.next_message(ALICE))["text"]
    await server.send_text(ALICE, ALICE, "x" * 100_000)
    assert "100,000 characters" in (await server.next_message(ALICE))["text"]

    rtl = "أريد السفر إلى باريس في الربيع"
    for text in ("\x00\x07Hello\x1b[31m there\x7f", rtl):
        await server.send_text(ALICE, ALICE, text)
    # Opening line, then one reply per valid message, in order.
    for _ in range(3):
        assert (await server.next_message(ALICE))["text"].strip()
    user_turns = [t.text for t in await harness.turns(ALICE) if t.role == "user"]
    assert user_turns == ["Hello[31m there", rtl]

    reply = server.messages_to(ALICE)[-1]
    turn_id = decode_feedback(buttons(reply)[0][1])[0]
    forged = {
        "not-ours": "isn't one of mine",
        "fb:999999999:up": "isn't stored",
        f"fb:{turn_id}:sideways": "isn't one of mine",
        "fb:" + "9" * 40 + ":up": "isn't one of mine",
    }
    for data, expected in forged.items():
        query_id = await server.press_button(ALICE, ALICE, reply, data)
        answer = await server.wait_for_call(
            "answerCallbackQuery", lambda c, q=query_id: c.params["callback_query_id"] == q
        )
        assert expected in answer.params["text"], data
    assert await harness.feedback() == []
    assert server.calls_to("editMessageReplyMarkup") == []

    # Bob presses Alice's 👍 (e.g. in a shared group): refused, nothing stored.
    query_id = await server.press_button(ALICE, BOB, reply, buttons(reply)[0][1])
    answer = await server.wait_for_call("answerCallbackQuery", lambda c: c.params["callback_query_id"] == query_id)
    assert "your own conversation" in answer.params["text"]
    assert await harness.feedback() == []
    assert server.calls_to("editMessageReplyMarkup") == []

    # Still serving, and every update was consumed.
    await server.send_text(ALICE, ALICE, "Still there?")
    assert (await server.next_message(ALICE))["text"].strip()
    assert len([t for t in await harness.turns(ALICE) if t.role == "user"]) == 3


async def test_group_answers_only_mentions_and_replies(harness: Harness) -> None:
    server = harness.server
    bot = f"@{server.bot_username}"
    await server.send_text(GROUP, ALICE, "What do you all think about Lisbon?", chat_type="group")
    await server.send_command(GROUP, ALICE, "help@someone_else_bot", chat_type="group")
    question = await server.send_text(GROUP, ALICE, f"{bot} I'd like a city trip", chat_type="group")
    opening = await server.next_message(GROUP)
    answer = await server.next_message(GROUP)
    # Updates of one chat are handled in order, so the two before were looked at first and ignored.
    assert opening["text"] == load_task("travel").opening_line
    assert opening["reply_to_message"]["message_id"] == question["message_id"]
    assert [t.text for t in await harness.turns(ALICE, GROUP) if t.role == "user"] == ["I'd like a city trip"]

    await server.send_text(GROUP, ALICE, "With museums", chat_type="group", reply_to=answer)
    await server.next_message(GROUP)
    await server.send_command(GROUP, ALICE, "end", "bad", chat_type="group", address_bot=True)
    assert "ended" in (await server.next_message(GROUP))["text"].lower()
    turns = await harness.turns(ALICE, GROUP)
    assert [t.text for t in turns if t.role == "user"] == ["I'd like a city trip", "With museums"]
    assert (await harness.store.get_conversation(turns[0].conversation_id)).reward == 0.0
    assert len(server.messages_to(GROUP)) == 4
    assert all(m["text"] != APOLOGY for m in server.messages_to(GROUP))


async def test_failed_send_is_logged_apologised_and_polling_goes_on(harness: Harness) -> None:
    server = harness.server
    server.fail_next("sendMessage", description="Bad Request: injected failure")
    await server.send_text(ALICE, ALICE, "Mountains, maybe?")
    assert (await server.next_message(ALICE))["text"] == APOLOGY
    await server.send_text(ALICE, ALICE, "Hello again")
    assert (await server.next_message(ALICE))["text"].strip()
    # Both messages were logged although the first reply never reached the user.
    assert [t.text for t in await harness.turns(ALICE) if t.role == "user"] == ["Mountains, maybe?", "Hello again"]


async def test_flood_control_is_waited_out_not_lost(harness: Harness) -> None:
    server = harness.server
    server.fail_next("sendMessage", error_code=429, description="Too Many Requests: retry after 1", retry_after=1)
    await server.send_command(ALICE, ALICE, "help")
    help_text = (await server.next_message(ALICE))["text"]
    assert "/end" in help_text
    assert len(server.calls_to("sendMessage")) == 2  # refused once, sent on the retry


async def test_non_text_messages_get_a_hint(harness: Harness) -> None:
    server = harness.server
    sticker = {
        "file_id": "s1",
        "file_unique_id": "u1",
        "type": "regular",
        "width": 512,
        "height": 512,
        "is_animated": False,
        "is_video": False,
    }
    await server.push_update(
        {
            "message": {
                "message_id": 77,
                "date": 0,
                "chat": server.chat(ALICE),
                "from": server.user(ALICE),
                "sticker": sticker,
            }
        }
    )
    assert (await server.next_message(ALICE))["text"] == TEXT_ONLY
    assert await harness.turns(ALICE) == []


async def test_stop_lets_the_reply_in_flight_finish(harness: Harness) -> None:
    server = harness.server
    await server.send_text(ALICE, ALICE, "Quick question")
    await server.wait_for_call("sendChatAction", lambda c: c.params["chat_id"] == str(ALICE))
    await harness.shut_down()
    sent = server.messages_to(ALICE)
    assert len(sent) == 2  # opening line and the reply
    assert len(await harness.turns(ALICE)) == 3
    assert server.pending_updates() == 0  # confirmed to Telegram, so not fetched again after a restart


async def test_rejected_token_turns_the_adapter_off_without_logging_it(
    sqlite_store: Store, tiny_policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (None, "httpx", "telegram"):
        caplog.set_level(logging.DEBUG, logger=name)
    async with FakeTelegramServer() as server:
        wrong = "111111:WRONG-token-BBBBBBBBBBBBBBBBBBBBBBBBBBBB"
        settings = Settings(_env_file=None, telegram_token=wrong, telegram_base_url=server.base_url)
        service = DialogueService(
            store=sqlite_store, policies=PolicyHolder(tiny_policy), task=load_task("travel"), settings=settings
        )
        await asyncio.wait_for(run_telegram(service, settings, asyncio.Event()), 30)
    assert "rejected the bot token" in caplog.text
    assert "WRONG-token" not in caplog.text


async def test_unreachable_telegram_at_start_is_retried(sqlite_store: Store, tiny_policy: Policy) -> None:
    async with FakeTelegramServer() as server:
        server.fail_next("getMe", error_code=502, description="Bad Gateway", times=2)
        settings = Settings(_env_file=None, telegram_token=server.token, telegram_base_url=server.base_url)
        service = DialogueService(
            store=sqlite_store, policies=PolicyHolder(tiny_policy), task=load_task("travel"), settings=settings
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_telegram(service, settings, stop, retry_delay_s=0.05))
        await server.send_command(ALICE, ALICE, "start")
        assert (await server.next_message(ALICE))["text"] == load_task("travel").opening_line
        assert len(server.calls_to("getMe")) == 3
        stop.set()
        await asyncio.wait_for(task, 30)


def test_mentions_are_cut_by_utf16_offsets_and_commands_for_other_bots_skipped() -> None:
    from datetime import UTC, datetime

    from telegram import Chat, Message, MessageEntity

    from bot.adapters.telegram import addressed_text, parse_command
    from tests.fakes.telegram_api import utf16_length

    group = Chat(GROUP, Chat.GROUP)
    text = "🇵🇹 @Reverie_Test_Bot Lisbon in spring?"
    offset = utf16_length("🇵🇹 ")
    mention = MessageEntity(MessageEntity.MENTION, offset, utf16_length("@Reverie_Test_Bot"))
    message = Message(1, datetime.now(UTC), group, text=text, entities=(mention,))
    assert addressed_text(message, 999, "reverie_test_bot") == "🇵🇹 Lisbon in spring?"
    assert addressed_text(message, 999, "another_bot") is None

    def command(text: str) -> Message:
        length = len(text.split()[0])
        entity = MessageEntity(MessageEntity.BOT_COMMAND, 0, length)
        return Message(3, datetime.now(UTC), group, text=text, entities=(entity,))

    assert parse_command(command("/End@reverie_test_bot  good "), "reverie_test_bot") == ("end", "good")
    assert parse_command(command("/rate 4"), "reverie_test_bot") == ("rate", "4")
    assert parse_command(command("/help@other_bot"), "reverie_test_bot") is None


def test_chunks_fit_telegram_in_utf16_units() -> None:
    from bot.adapters.telegram import telegram_chunks
    from tests.fakes.telegram_api import utf16_length

    emoji = "😀 " * 3000  # 6000 code points, 9000 UTF-16 units
    assert telegram_chunks("short") == ["short"] and telegram_chunks("  ") == []
    chunks = telegram_chunks(emoji)
    assert len(chunks) >= 3
    assert all(utf16_length(chunk) <= 4096 for chunk in chunks)
    assert "".join(chunks).replace(" ", "") == emoji.replace(" ", "")
