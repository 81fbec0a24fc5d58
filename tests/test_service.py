"""DialogueService end to end on a real Store (SQLite and PostgreSQL) with real policies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from bot.adapters.discord import discord_chunks
from bot.adapters.telegram import telegram_chunks
from bot.events import ChatRef, Reply, encode_feedback
from bot.policy_holder import PolicyHolder
from bot.service import POLICY_APOLOGY, DialogueService
from bot.settings import Settings
from bot.text import sanitize
from imagine.task import load_task
from imagine.world import world_for
from learning.interface import History, Policy
from storage import ConversationStatus, Feedback, Store
from storage.database import Database

TASK = load_task("travel")
ALICE = ChatRef(platform="telegram", chat_id="100", user_id="1", user_name="alice")
#: A long reply of varied sentences (every phrasing the shipped worlds give their users): longer than a Telegram
#: message, and not a loop, so the reply guard lets it through.
LONG_ANSWER = " ".join(
    say
    for task in ("travel", "teaching", str(Path(__file__).resolve().parents[1] / "examples" / "houseplants.toml"))
    for attribute in world_for(task).preferences
    for value in attribute.values
    for say in value.says
)
BOB = ChatRef(platform="telegram", chat_id="200", user_id="2", user_name="bob")
ADMIN = ChatRef(platform="discord", chat_id="300", user_id="99", user_name="root")


class ScriptedPolicy:
    """A deterministic policy: answers with what it saw, optionally slowly or failing on a marker."""

    def __init__(self, name: str = "scripted", version_id: int | None = None, delay: float = 0.0) -> None:
        self.name = name
        self.version_id = version_id
        self.delay = delay
        self.seen: list[list[tuple[str, str]]] = []
        self.closed = False

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        return [self._answer(history) for history in histories]

    async def respond(self, history: History) -> str:
        assert not self.closed, "a closed policy was used"
        self.seen.append([(m.role, m.text) for m in history])
        if "EXPLODE" in history[-1].text:
            raise RuntimeError("policy crashed")
        if "HANG" in history[-1].text:
            await asyncio.sleep(3600)
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._answer(history)

    def _answer(self, history: History) -> str:
        if "LONG" in history[-1].text:
            return LONG_ANSWER
        if "CONTROL" in history[-1].text:
            return "\x00\x07   "
        return f"{self.name} heard: {history[-1].text}"

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def tiny_policy() -> Iterator[Policy]:
    """The real prompted base policy on the tiny random model (its replies are gibberish, often with controls)."""
    import torch

    from learning.policy import load_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from more; spinning threads crawl on a busy machine
    policy = load_policy("base", task=TASK, base_model="tiny", max_new_tokens=4)
    yield policy
    policy.close()
    torch.set_num_threads(threads)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def make_service(store: Store, policy: Policy | None = None, **settings: object) -> DialogueService:
    values: dict[str, object] = {"admin_ids": ["discord:99"], "max_message_chars": 4000, **settings}
    return DialogueService(
        store=store,
        policies=PolicyHolder(policy or ScriptedPolicy()),
        task=TASK,
        settings=Settings(_env_file=None, **values),
        clock=Clock(),
    )


async def feedback_rows(store: Store) -> list[Feedback]:
    async with store.database.session() as session:
        return list((await session.exec(select(Feedback))).all())


async def test_whole_conversation_is_logged_with_thumbs_and_reward(store: Store, tiny_policy: Policy) -> None:
    service = make_service(store, tiny_policy)
    opening = await service.handle_command(ALICE, "start")
    assert opening[0].text == TASK.opening_line and opening[0].turn_id is not None

    first = await service.handle_message(ALICE, "I love museums")
    second = await service.handle_message(ALICE, "and a tight budget")
    assert len(first) == len(second) == 1
    assert second[0].turn_id is not None and not second[0].private and not second[0].is_error

    toast = await service.handle_feedback(ALICE, encode_feedback(second[0].turn_id, True))
    assert "👍" in toast
    assert "Already" in await service.handle_feedback(ALICE, encode_feedback(second[0].turn_id, True))
    assert "👎" in await service.handle_feedback(ALICE, encode_feedback(second[0].turn_id, False))

    ended = await service.handle_command(ALICE, "/end", "good")
    assert "ended" in ended[0].text

    turn = await store.get_turn(second[0].turn_id)
    conversation = await store.get_conversation(turn.conversation_id)
    assert conversation.reward == 1.0 and conversation.reward_source == "end"
    assert conversation.status == ConversationStatus.CLOSED
    turns = await store.get_turns(conversation.id)
    assert [(t.role, t.text) for t in turns] == [
        ("agent", TASK.opening_line),
        ("user", "I love museums"),
        ("agent", first[0].text),
        ("user", "and a tight budget"),
        ("agent", second[0].text),
    ]
    assert [t.id for t in turns if t.role == "agent"] == [opening[0].turn_id, first[0].turn_id, second[0].turn_id]
    assert all(t.text == sanitize(t.text) != "" for t in turns)  # the random model's control bytes are gone
    assert [t.latency_ms is not None and t.latency_ms > 0 for t in turns] == [False, False, True, False, True]
    thumbs = [f for f in await feedback_rows(store) if f.kind == "thumbs"]
    assert [(f.turn_id, f.value) for f in thumbs] == [(second[0].turn_id, -1.0)]
    records = await store.dialogues_for_training(sources=["real"])
    assert len(records) == 1 and records[0].turns[4].thumbs == -1.0


async def test_message_without_conversation_opens_one_and_end_bad_rewards_zero(sqlite_store: Store) -> None:
    service = make_service(sqlite_store)
    replies = await service.handle_message(ALICE, "hello")
    assert [r.text for r in replies] == [TASK.opening_line, "scripted heard: hello"]
    assert all(r.turn_id is not None for r in replies)
    await service.handle_command(ALICE, "end", "BAD")
    turn = await sqlite_store.get_turn(replies[1].turn_id)
    conversation = await sqlite_store.get_conversation(turn.conversation_id)
    assert conversation.reward == 0.0
    refused = await service.handle_command(ALICE, "end", "meh")
    assert refused[0].is_error and "/end good" in refused[0].text
    nothing_open = await service.handle_command(ALICE, "end", "good")
    assert "no open conversation" in nothing_open[0].text


async def test_rate_and_feedback_are_recorded(sqlite_store: Store) -> None:
    service = make_service(sqlite_store)
    assert "no conversation" in (await service.handle_command(ALICE, "rate", "4"))[0].text
    replies = await service.handle_message(ALICE, "hi")
    conversation_id = (await sqlite_store.get_turn(replies[1].turn_id)).conversation_id
    assert "saved" in (await service.handle_command(ALICE, "feedback", "ask  about\x07 kids 🧒"))[0].text
    assert (await service.handle_command(ALICE, "rate", "6"))[0].is_error
    assert "4/5" in (await service.handle_command(ALICE, "rate", "4"))[0].text
    conversation = await sqlite_store.get_conversation(conversation_id)
    assert conversation.reward == 0.75 and conversation.status == ConversationStatus.CLOSED
    # Re-rating the closed conversation replaces its reward.
    await service.handle_command(ALICE, "rate", "1")
    assert (await sqlite_store.get_conversation(conversation_id)).reward == 0.0
    rows = await feedback_rows(sqlite_store)
    assert sorted((f.kind, f.value, f.text) for f in rows) == [
        ("rating", 1.0, None),
        ("rating", 4.0, None),
        ("text", None, "ask  about kids 🧒"),
    ]
    assert "Write your feedback" in (await service.handle_command(ALICE, "feedback", "  "))[0].text


async def test_forget_deletes_everything_of_the_caller_only(store: Store) -> None:
    service = make_service(store)
    alice_replies = await service.handle_message(ALICE, "alice's secret")
    await service.handle_feedback(ALICE, encode_feedback(alice_replies[1].turn_id, True))
    await service.handle_command(ALICE, "end", "good")
    await service.handle_message(ALICE, "second chat")
    other_chat = ChatRef(platform="telegram", chat_id="555", user_id="1")
    await service.handle_message(other_chat, "from another chat")
    bob_replies = await service.handle_message(BOB, "bob stays")

    done = await service.handle_command(ALICE, "forget")
    assert "deleted 3 conversations" in done[0].text
    assert await store.get_turn(alice_replies[1].turn_id) is None
    assert [f.user_key for f in await feedback_rows(store)] == []
    assert await store.get_turn(bob_replies[1].turn_id) is not None
    # A button on a forgotten reply records nothing; a new message starts a fresh conversation.
    assert "isn't stored" in await service.handle_feedback(ALICE, encode_feedback(alice_replies[1].turn_id, True))
    fresh = await service.handle_message(ALICE, "new start")
    assert fresh[0].text == TASK.opening_line
    await service.handle_command(ALICE, "end", "good")
    records = await store.dialogues_for_training(sources=["real"])
    assert all(r.turns[1].text != "new start" for r in records)


async def test_admin_commands_are_refused_to_others_and_explain_a_missing_improver(sqlite_store: Store) -> None:
    service = make_service(sqlite_store, ScriptedPolicy(name="base"))
    for command in ("status", "retrain", "rollback"):
        refused = await service.handle_command(ALICE, command)
        assert refused[0].is_error and "only for admins" in refused[0].text
    status = (await service.handle_command(ADMIN, "status"))[0].text
    assert "Active policy: base (untrained base model)" in status
    assert "Last training run: none yet" in status and "not running" in status
    run = await sqlite_store.start_training_run(trigger="schedule")
    await sqlite_store.update_training_run(run.id, status="failed", error="out of memory")
    assert f"#{run.id} failed" in (await service.handle_command(ADMIN, "status"))[0].text
    retrain = await service.handle_command(ADMIN, "retrain")
    assert retrain[0].is_error and "improvement loop is not running" in retrain[0].text
    help_for_admin = (await service.handle_command(ADMIN, "help"))[0].text
    help_for_user = (await service.handle_command(ALICE, "help"))[0].text
    assert "/rollback" in help_for_admin and "/rollback" not in help_for_user
    unknown = await service.handle_command(ALICE, "dance")
    assert "/help" in unknown[0].text and "/dance" in unknown[0].text


class RecordingImprover:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def request_run(self, *, trigger: str, requested_by: str) -> str:
        self.calls.append(("run", requested_by))
        return "Improvement run started."

    async def rollback(self, *, requested_by: str) -> str:
        self.calls.append(("rollback", requested_by))
        return "Rolled back to #1."

    async def status_lines(self) -> list[str]:
        return ["Next run: 03:00 UTC"]


async def test_admin_commands_reach_the_improver(sqlite_store: Store) -> None:
    service = make_service(sqlite_store)
    improver = RecordingImprover()
    service.improver = improver
    assert (await service.handle_command(ADMIN, "retrain"))[0].text == "Improvement run started."
    assert (await service.handle_command(ADMIN, "rollback"))[0].text == "Rolled back to #1."
    assert "Next run: 03:00 UTC" in (await service.handle_command(ADMIN, "status"))[0].text
    assert improver.calls == [("run", "discord:99"), ("rollback", "discord:99")]


async def test_bad_input_is_refused_clearly_and_the_session_keeps_working(store: Store) -> None:
    service = make_service(store)
    empty = await service.handle_message(ALICE, " \x00\x1b \u0085 ")
    assert empty[0].is_error and "empty" in empty[0].text
    huge = await service.handle_message(ALICE, "x" * 100_000)
    assert huge[0].is_error and "100,000 characters" in huge[0].text and "4,000" in huge[0].text
    assert await store.count_conversations() == 0  # refused input opened nothing

    odd = "שלום\u200f עולם e\u0301 🧳\x07\r\nnext\tline"
    replies = await service.handle_message(ALICE, odd)
    expected = "שלום\u200f עולם é 🧳\nnext\tline"
    assert replies[-1].text == f"scripted heard: {expected}"
    turns = await store.get_turns((await store.get_turn(replies[-1].turn_id)).conversation_id)
    assert turns[1].text == expected


async def test_policy_failure_apologises_logs_the_turn_and_recovers(store: Store) -> None:
    service = make_service(store)
    service.policy_timeout_s = 0.2
    crashed = await service.handle_message(ALICE, "EXPLODE please")
    assert crashed[-1].text == POLICY_APOLOGY and crashed[-1].is_error and crashed[-1].turn_id is None
    hung = await service.handle_message(ALICE, "HANG please")
    assert hung[-1].text == POLICY_APOLOGY
    silent = await service.handle_message(ALICE, "CONTROL chars only")
    assert silent[-1].text == POLICY_APOLOGY
    fine = await service.handle_message(ALICE, "hello again")
    assert fine[-1].text == "scripted heard: hello again"
    turns = await store.get_turns((await store.get_turn(fine[-1].turn_id)).conversation_id)
    assert [t.role for t in turns] == ["agent", "user", "user", "user", "user", "agent"]


async def test_long_replies_come_whole_and_each_adapter_splits_them_to_its_limit(sqlite_store: Store) -> None:
    service = make_service(sqlite_store)
    whole = LONG_ANSWER
    for chat in (ALICE, ChatRef(platform="discord", chat_id="1", user_id="7")):
        reply = (await service.handle_message(chat, "LONG answer please"))[-1]
        assert reply.text == whole  # the service is neutral: presentation is the adapter's
    for chunks, limit in ((telegram_chunks(whole), 4096), (discord_chunks(whole), 2000)):
        assert len(chunks) > 1 and all(len(c) <= limit for c in chunks)
        assert all(c.endswith(". ") for c in chunks[:-1])  # cut after a sentence, not inside one
        assert "".join(chunks) == whole


async def test_database_failure_becomes_an_apology(tmp_path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'gone.db'}")
    await database.create_schema()
    service = make_service(Store(database))
    await database.engine.dispose()
    (tmp_path / "gone.db").unlink()
    (tmp_path / "gone.db").mkdir()  # the file is now a directory: every query fails
    replies = await service.handle_message(ALICE, "hello?")
    assert replies[0].is_error and "couldn't save that" in replies[0].text
    assert "try again" in await service.handle_feedback(ALICE, encode_feedback(1, True))
    assert (await service.handle_command(ALICE, "start"))[0].is_error
    await database.dispose()


async def test_forged_and_foreign_feedback_records_nothing(store: Store) -> None:
    service = make_service(store)
    replies = await service.handle_message(ALICE, "hello")
    agent_turn = replies[1].turn_id
    user_turn = agent_turn - 1
    for data in ("", "fb:abc:up", f"fb:{agent_turn}:sideways", f"fb:{agent_turn}:up:extra", "x" * 500, None):
        assert "isn't one of mine" in await service.handle_feedback(ALICE, data)
    assert "isn't stored" in await service.handle_feedback(ALICE, encode_feedback(user_turn, True))
    assert "isn't stored" in await service.handle_feedback(ALICE, encode_feedback(987654, True))
    assert "your own conversation" in await service.handle_feedback(BOB, encode_feedback(agent_turn, True))
    same_id_other_platform = ChatRef(platform="discord", chat_id="100", user_id="1")
    assert "your own" in await service.handle_feedback(same_id_other_platform, encode_feedback(agent_turn, False))
    assert await feedback_rows(store) == []


async def test_feedback_buttons_survive_a_restart_and_conversations_resume(store: Store) -> None:
    before = make_service(store)
    replies = await before.handle_message(ALICE, "remember me")
    await before.shutdown()
    assert (await before.handle_message(ALICE, "too late"))[0].is_error

    after = make_service(store, ScriptedPolicy(name="after"))
    assert "👍" in await after.handle_feedback(ALICE, encode_feedback(replies[1].turn_id, True))
    continued = await after.handle_message(ALICE, "still there?")
    assert [r.text for r in continued] == ["after heard: still there?"]  # no new opening line
    seen = after.policies.active.seen[-1]
    assert seen[:3] == [("agent", TASK.opening_line), ("user", "remember me"), ("agent", "scripted heard: remember me")]
    conversation_id = (await store.get_turn(continued[0].turn_id)).conversation_id
    assert conversation_id == (await store.get_turn(replies[1].turn_id)).conversation_id


async def test_turns_in_one_session_are_processed_in_order(store: Store) -> None:
    service = make_service(store, ScriptedPolicy(delay=0.01))
    texts = [f"message {i}" for i in range(TASK.max_turns)]
    results = await asyncio.gather(*(service.handle_message(ALICE, text) for text in texts))
    replies = [[r for r in result if r.turn_id][-1] for result in results]
    assert [r.text for r in replies] == [f"scripted heard: {text}" for text in texts]
    turns = await store.get_turns((await store.get_turn(replies[0].turn_id)).conversation_id)
    assert [(t.role, t.text) for t in turns[1::2]] == [("user", text) for text in texts]
    assert [(t.role, t.id, t.text) for t in turns[2::2]] == [("agent", r.turn_id, r.text) for r in replies]
    # The opening line and max_turns - 1 replies reach the task's max_turns: the user is asked for a verdict once.
    assert [i for i, r in enumerate(results) if "/end good" in r[-1].text] == [TASK.max_turns - 2]


async def test_concurrent_sessions_share_the_real_policy_without_mixing_replies(
    sqlite_store: Store, tiny_policy: Policy
) -> None:
    service = make_service(sqlite_store, tiny_policy)
    chats = [ChatRef(platform="telegram", chat_id=str(i), user_id=str(i)) for i in range(4)]
    results = await asyncio.gather(*(service.handle_message(chat, f"I am user {i}") for i, chat in enumerate(chats)))
    for i, result in enumerate(results):
        turns = await sqlite_store.get_turns((await sqlite_store.get_turn(result[-1].turn_id)).conversation_id)
        assert [(t.role, t.text) for t in turns] == [
            ("agent", TASK.opening_line),
            ("user", f"I am user {i}"),
            ("agent", result[-1].text),
        ]


async def test_idle_sessions_expire_without_reward(store: Store) -> None:
    service = make_service(store)
    clock: Clock = service.clock  # type: ignore[assignment]
    replies = await service.handle_message(ALICE, "hi")
    await service.handle_message(BOB, "hi")
    conversation_id = (await store.get_turn(replies[1].turn_id)).conversation_id
    clock.now += timedelta(minutes=20)
    await service.handle_message(BOB, "still here")
    assert await service.expire_idle_sessions() == 0
    clock.now += timedelta(minutes=11)
    assert await service.expire_idle_sessions() == 1  # alice: 31 min idle; bob: 11 min
    expired = await store.get_conversation(conversation_id)
    assert expired.status == ConversationStatus.EXPIRED and expired.reward is None
    fresh = await service.handle_message(ALICE, "back again")
    assert fresh[0].text == TASK.opening_line


async def test_conversations_left_open_by_a_dead_process_expire(sqlite_store: Store) -> None:
    old = make_service(sqlite_store)
    replies = await old.handle_message(ALICE, "hi")
    conversation_id = (await sqlite_store.get_turn(replies[1].turn_id)).conversation_id
    new = make_service(sqlite_store)
    assert await new.expire_idle_sessions() == 0  # recent activity
    new.clock.now += timedelta(hours=1)  # type: ignore[attr-defined]
    assert await new.expire_idle_sessions() == 1
    assert (await sqlite_store.get_conversation(conversation_id)).status == ConversationStatus.EXPIRED


async def test_swap_during_turns_logs_each_turn_with_the_version_that_served_it(store: Store) -> None:
    v1 = await store.register_policy_version(path="/v1", sha256="1" * 64, base_model="tiny", algorithm="bc")
    v2 = await store.register_policy_version(path="/v2", sha256="2" * 64, base_model="tiny", algorithm="ilql")
    old = ScriptedPolicy(name="old", version_id=v1.id, delay=0.2)
    new = ScriptedPolicy(name="new", version_id=v2.id)
    service = make_service(store, old)
    await service.handle_command(ALICE, "start")
    await service.handle_command(BOB, "start")
    in_flight = asyncio.gather(service.handle_message(ALICE, "slow one"), service.handle_message(BOB, "slow two"))
    while service.policies.leases(old) < 2:
        await asyncio.sleep(0.01)
    assert service.policies.swap(new) is old
    assert not old.closed  # two turns still hold it
    during = await service.handle_message(ChatRef(platform="console", chat_id="c", user_id="u"), "fast")
    slow = await in_flight
    assert old.closed and not new.closed
    assert [r[-1].text for r in slow] == ["old heard: slow one", "old heard: slow two"]
    assert during[-1].text == "new heard: fast"
    for replies, version in ((slow[0], v1.id), (slow[1], v1.id), (during, v2.id)):
        agent = await store.get_turn(replies[-1].turn_id)
        user = (await store.get_turns(agent.conversation_id))[agent.index - 1]
        assert (agent.policy_version_id, user.policy_version_id) == (version, version)


async def test_shutdown_waits_for_turns_in_flight(sqlite_store: Store) -> None:
    service = make_service(sqlite_store, ScriptedPolicy(delay=0.2))
    pending = asyncio.create_task(service.handle_message(ALICE, "finish me"))
    await asyncio.sleep(0.05)
    await service.shutdown()
    assert pending.done() and (await pending)[-1].text == "scripted heard: finish me"
    refused = await service.handle_command(ALICE, "start")
    assert refused[0].is_error and "restarting" in refused[0].text


@pytest.mark.parametrize(
    ("platform", "chunks", "limit"), [("telegram", telegram_chunks, 4096), ("discord", discord_chunks, 2000)]
)
async def test_every_reply_fits_its_platform(
    sqlite_store: Store, platform: str, chunks: Callable[[str], list[str]], limit: int
) -> None:
    service = make_service(sqlite_store, max_message_chars=200_000)
    chat = ChatRef(platform=platform, chat_id="1", user_id="1")
    replies: list[Reply] = await service.handle_message(chat, "LONG " + "word " * 30_000)
    assert all(0 < len(chunk) <= limit for r in replies for chunk in chunks(r.text))


async def test_command_names_are_normalised_and_start_replaces_an_open_conversation(sqlite_store: Store) -> None:
    service = make_service(sqlite_store)
    first = await service.handle_message(ALICE, "hi")
    again = await service.handle_command(ALICE, "/START@ReverieBot")
    assert [r.text for r in again] == [TASK.opening_line]
    old = await sqlite_store.get_conversation((await sqlite_store.get_turn(first[1].turn_id)).conversation_id)
    assert old.status == ConversationStatus.CLOSED and old.reward is None
    reset = await service.handle_command(ALICE, "reset")
    assert reset[0].text == "Okay, let's start over." and reset[1].text == TASK.opening_line
    assert await sqlite_store.count_conversations() == 3
    assert [c.name for c in service.commands if c.admin_only] == ["status", "retrain", "rollback"]


async def test_replicas_on_one_database_continue_one_conversation_whichever_gets_the_message(store: Store) -> None:
    """Two services on one database (two replicas behind a load balancer): consecutive messages of one chat land
    on alternating replicas; they stay one conversation, each replica's policy sees every earlier turn, and an
    /end on one is seen by the other."""
    first_policy, second_policy = ScriptedPolicy("one"), ScriptedPolicy("two")
    first, second = make_service(store, first_policy), make_service(store, second_policy)
    await first.handle_message(ALICE, "hello")
    await second.handle_message(ALICE, "a beach")
    await first.handle_message(ALICE, "with my kids")
    assert len(await store.open_conversations()) == 1
    assert [text for _, text in first_policy.seen[-1]] == [
        TASK.opening_line,
        "hello",
        "one heard: hello",
        "a beach",
        "two heard: a beach",
        "with my kids",
    ]
    await second.handle_command(ALICE, "end", "good")
    assert await store.open_conversations() == []
    await first.handle_message(ALICE, "hello again")  # a new conversation, not a turn of the closed one
    (reopened,) = await store.open_conversations()
    assert [turn.text for turn in await store.get_turns(reopened.id or 0)][1:2] == ["hello again"]
