"""Storage: every query on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from storage import (
    ConversationStatus,
    Database,
    DatabaseUnavailableError,
    PolicyStatus,
    RunStatus,
    Store,
    StoreError,
)


async def _chat(store: Store, user_key: str = "telegram:1", reward: float | None = 1.0) -> int:
    conversation = await store.start_conversation(
        source="real", platform="telegram", task="travel", chat_key="chat", user_key=user_key
    )
    await store.append_turn(conversation.id, "user", "I love museums")
    agent = await store.append_turn(conversation.id, "agent", "Try the Louvre!", latency_ms=12.5)
    await store.record_feedback(
        conversation_id=conversation.id, user_key=user_key, kind="thumbs", value=1.0, turn_id=agent.id
    )
    await store.close_conversation(conversation.id, reward=reward, reward_source="end" if reward else None)
    return conversation.id


async def test_turns_are_appended_in_order_with_utc_times(store: Store) -> None:
    conversation = await store.start_conversation(source="real", platform="console", task="travel")
    for i in range(5):
        await store.append_turn(conversation.id, "user" if i % 2 == 0 else "agent", f"turn {i}")
    turns = await store.get_turns(conversation.id)
    assert [t.index for t in turns] == [0, 1, 2, 3, 4]
    assert [t.text for t in turns] == [f"turn {i}" for i in range(5)]
    assert all(t.created_at.tzinfo is not None and t.created_at.utcoffset().total_seconds() == 0 for t in turns)
    assert turns[0].created_at.tzinfo == UTC


async def test_unicode_and_long_text_round_trip(store: Store) -> None:
    conversation = await store.start_conversation(source="real", platform="console", task="travel")
    odd = "שלום עולם \u202e reversed \u200b zero-width 🧳✈️ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " + "x" * 100_000
    turn = await store.append_turn(conversation.id, "user", odd)
    assert (await store.get_turn(turn.id)).text == odd


async def test_appending_to_closed_or_missing_conversation_is_refused(store: Store) -> None:
    conversation = await store.start_conversation(source="real", platform="console", task="travel")
    await store.close_conversation(conversation.id)
    with pytest.raises(StoreError, match="closed"):
        await store.append_turn(conversation.id, "user", "late")
    with pytest.raises(StoreError, match="no conversation"):
        await store.append_turn(999_999, "user", "nobody")
    fresh = await store.start_conversation(source="real", platform="console", task="travel")
    with pytest.raises(StoreError, match="role"):
        await store.append_turn(fresh.id, "system", "x")


async def test_thumbs_are_idempotent_and_switchable(store: Store) -> None:
    conversation = await store.start_conversation(source="real", platform="discord", task="travel", user_key="d:1")
    await store.append_turn(conversation.id, "user", "hi")
    agent = await store.append_turn(conversation.id, "agent", "hello")
    _, changed = await store.record_feedback(
        conversation_id=conversation.id, user_key="d:1", kind="thumbs", value=1.0, turn_id=agent.id
    )
    assert changed
    _, changed = await store.record_feedback(
        conversation_id=conversation.id, user_key="d:1", kind="thumbs", value=1.0, turn_id=agent.id
    )
    assert not changed
    await store.record_feedback(
        conversation_id=conversation.id, user_key="d:1", kind="thumbs", value=-1.0, turn_id=agent.id
    )
    await store.close_conversation(conversation.id, reward=0.0, reward_source="end")
    [record] = await store.dialogues_for_training()
    assert record.turns[1].thumbs == -1.0


async def test_feedback_on_a_turn_of_another_conversation_is_refused(store: Store) -> None:
    first = await _chat(store, "telegram:1")
    second = await store.start_conversation(source="real", platform="telegram", task="travel", user_key="t:2")
    first_turns = await store.get_turns(first)
    with pytest.raises(StoreError, match="not part of"):
        await store.record_feedback(
            conversation_id=second.id, user_key="t:2", kind="thumbs", value=1.0, turn_id=first_turns[1].id
        )


async def test_training_selection_filters_source_reward_time_and_consent(store: Store) -> None:
    rewarded = await _chat(store, "telegram:1", reward=1.0)
    await _chat(store, "telegram:2", reward=None)  # no reward: excluded
    no_consent = await store.start_conversation(
        source="real", platform="telegram", task="travel", user_key="telegram:3", consent=False
    )
    await store.append_turn(no_consent.id, "user", "x")
    await store.close_conversation(no_consent.id, reward=1.0, reward_source="end")
    await store.save_dialogue(
        source="imagined",
        platform="imagined",
        task="travel",
        turns=[("user", "hi"), ("agent", "hello")],
        reward=0.0,
        persona={"likes": "hiking"},
    )
    await store.save_dialogue(
        source="evaluation", platform="sim", task="travel", turns=[("user", "a"), ("agent", "b")], reward=1.0
    )
    await store.save_dialogue(
        source="imagined", platform="imagined", task="teaching", turns=[("user", "q"), ("agent", "a")], reward=1.0
    )
    records = await store.dialogues_for_training(task="travel")
    assert sorted(r.source for r in records) == ["imagined", "real"]
    assert {r.id for r in records if r.source == "real"} == {rewarded}
    imagined = next(r for r in records if r.source == "imagined")
    assert imagined.persona == {"likes": "hiking"} and imagined.reward == 0.0
    real_only = await store.dialogues_for_training(sources=["real"])
    assert [r.id for r in real_only] == [rewarded]
    cutoff = real_only[0].ended_at
    assert await store.dialogues_for_training(sources=["real"], since=cutoff) == []


async def test_training_selection_keeps_the_newest_when_limited(store: Store) -> None:
    ids = [
        (
            await store.save_dialogue(
                source="imagined", platform="imagined", task="travel", turns=[("agent", f"a{i}")], reward=0.0
            )
        ).id
        for i in range(5)
    ]
    newest = await store.dialogues_for_training(sources=["imagined"], limit=2, newest=True)
    assert [r.id for r in newest] == ids[-2:]  # the newest two, still oldest first
    oldest = await store.dialogues_for_training(sources=["imagined"], limit=2)
    assert [r.id for r in oldest] == ids[:2]


async def test_forget_deletes_everything_of_one_user_only(store: Store) -> None:
    mine = await _chat(store, "telegram:1")
    other = await _chat(store, "telegram:2")
    assert await store.forget_user("telegram:1") == 1
    assert await store.get_conversation(mine) is None
    assert await store.get_turns(mine) == []
    assert await store.get_conversation(other) is not None
    assert [r.id for r in await store.dialogues_for_training()] == [other]
    # A later conversation by the forgotten user stays out of training (tombstone).
    await _chat(store, "telegram:1")
    assert [r.id for r in await store.dialogues_for_training()] == [other]
    with pytest.raises(StoreError):
        await store.forget_user("")


async def test_policy_versions_activate_retire_and_roll_back(store: Store) -> None:
    assert await store.active_policy_version() is None
    v1 = await store.register_policy_version(
        path="/p/1", sha256="a" * 64, base_model="m", algorithm="ilql", metrics={"success": 0.4}
    )
    v2 = await store.register_policy_version(
        path="/p/2", sha256="b" * 64, base_model="m", algorithm="ilql", parent_id=v1.id
    )
    assert v1.status == PolicyStatus.CANDIDATE
    await store.activate_policy_version(v1.id)
    await store.activate_policy_version(v2.id)
    active = await store.active_policy_version()
    assert active.id == v2.id and active.activated_at is not None
    assert (await store.get_policy_version(v1.id)).status == PolicyStatus.RETIRED
    assert (await store.rollback_target()).id == v1.id
    await store.set_policy_status(v2.id, PolicyStatus.REJECTED, metrics={"why": "worse"})
    assert (await store.get_policy_version(v2.id)).metrics == {"why": "worse"}
    assert [v.id for v in await store.list_policy_versions()] == [v2.id, v1.id]
    with pytest.raises(StoreError):
        await store.activate_policy_version(12345)


async def test_training_runs_record_status_and_metrics(store: Store) -> None:
    run = await store.start_training_run(trigger="admin", config={"steps": 10})
    assert run.status == RunStatus.RUNNING and run.finished_at is None
    await store.update_training_run(run.id, n_imagined=5, metrics={"loss": 1.0})
    await store.update_training_run(run.id, status=RunStatus.FAILED, error="boom", metrics={"step": 3})
    last = await store.last_training_run()
    assert last.status == RunStatus.FAILED and last.finished_at is not None
    assert last.metrics == {"loss": 1.0, "step": 3} and last.n_imagined == 5
    other = await store.start_training_run(trigger="schedule")
    assert await store.fail_unfinished_runs("process restarted") == 1
    assert (await store.last_training_run()).id == other.id
    assert (await store.last_training_run()).status == RunStatus.FAILED


async def test_concurrent_appends_keep_distinct_indices(store: Store) -> None:
    conversation = await store.start_conversation(source="real", platform="console", task="travel")
    # The bot serialises turns per session; different sessions write concurrently.
    others = [await store.start_conversation(source="real", platform="console", task="t") for _ in range(8)]
    await asyncio.gather(*(store.append_turn(c.id, "user", "hi") for c in [conversation, *others]))
    counts = [len(await store.get_turns(c.id)) for c in [conversation, *others]]
    assert counts == [1] * 9


async def test_locked_sqlite_is_retried_then_reported(
    sqlite_database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(sqlite_database)
    conversation = await store.start_conversation(source="real", platform="console", task="travel")
    # Hold the write lock from another connection, release it shortly: the append must wait and succeed.
    blocker = sqlite_database.sync_engine.connect()
    blocker.exec_driver_sql("PRAGMA busy_timeout=0")
    blocker.exec_driver_sql("BEGIN IMMEDIATE")

    async def release_later() -> None:
        await asyncio.sleep(0.3)
        blocker.exec_driver_sql("COMMIT")

    async with sqlite_database.engine.connect() as connection:
        await connection.exec_driver_sql("PRAGMA busy_timeout=0")
    release = asyncio.create_task(release_later())
    caplog.set_level(logging.WARNING, logger="storage.database")
    turn = await store.append_turn(conversation.id, "user", "waited")
    await release
    assert turn.index == 0
    # The append did not just wait inside SQLite's busy handler: our retry ran, and it stored the turn once.
    assert any("database busy in _append_turn, retrying" in r.getMessage() for r in caplog.records)
    assert [t.text for t in await store.get_turns(conversation.id)] == ["waited"]
    blocker.close()

    # Held for longer than every retry together: reported as unavailable, naming the operation; nothing stored.
    blocker = sqlite_database.sync_engine.connect()
    blocker.exec_driver_sql("BEGIN IMMEDIATE")
    with pytest.raises(DatabaseUnavailableError, match="_append_turn"):
        await store.append_turn(conversation.id, "user", "gave up")
    blocker.exec_driver_sql("COMMIT")
    blocker.close()
    assert [t.text for t in await store.get_turns(conversation.id)] == ["waited"]


@pytest.mark.postgres
async def test_writes_whose_commit_acknowledgement_is_lost_are_stored_once(postgres_url: str) -> None:
    """A commit the server applied but whose answer never arrived: the retry must find the row, not add one."""
    from tests.conftest import _truncate_postgres
    from tests.fakes.tcp_proxy import TcpProxy

    await asyncio.to_thread(_truncate_postgres, postgres_url)
    url = make_url(postgres_url)
    async with TcpProxy(url.port or 5432) as proxy:
        database = Database(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
        store = Store(database)
        try:
            proxy.lose_commit_acks()
            conversation = await store.start_conversation(
                source="real", platform="telegram", task="travel", chat_key="telegram:1", user_key="telegram:1"
            )
            writes = [
                lambda: store.append_turn(conversation.id, "user", "yes"),
                lambda: store.append_turn(conversation.id, "agent", "Shall I book it?"),
                lambda: store.append_turn(conversation.id, "user", "yes"),  # the same words again: a new turn
                lambda: store.record_feedback(
                    conversation_id=conversation.id, user_key="telegram:1", kind="text", text="more beaches"
                ),
                lambda: store.record_feedback(
                    conversation_id=conversation.id, user_key="telegram:1", kind="rating", value=4.0
                ),
                lambda: store.close_conversation(conversation.id, reward=0.75, reward_source="rating"),
            ]
            results = []
            for write in writes:
                proxy.lose_commit_acks()
                results.append(await write())
            assert proxy.lost_acks == len(writes) + 1  # every write above lost its acknowledgement once
            turns = await store.get_turns(conversation.id)
            assert [(t.index, t.role, t.text) for t in turns] == [
                (0, "user", "yes"),
                (1, "agent", "Shall I book it?"),
                (2, "user", "yes"),
            ]
            assert [t.id for t in turns] == [r.id for r in results[:3]]
            feedback = await _all_feedback(store)
            assert sorted((f.kind, f.value, f.text) for f in feedback) == [
                ("rating", 4.0, None),
                ("text", None, "more beaches"),
            ]
            assert results[3][1] and results[4][1]  # reported as the change each one was
            assert await store.count_conversations() == 1
            closed = await store.get_conversation(conversation.id)
            assert (closed.status, closed.reward) == (ConversationStatus.CLOSED, 0.75)

            proxy.lose_commit_acks()
            assert await store.forget_user("telegram:1") == 1  # not 0: the retry reports what the commit did
            assert proxy.lost_acks == len(writes) + 2
        finally:
            await database.dispose()


async def _all_feedback(store: Store) -> list:
    from sqlmodel import select

    from storage import Feedback

    async with store.database.session() as session:
        return list((await session.exec(select(Feedback))).all())


async def test_forgotten_text_leaves_the_sqlite_files(sqlite_database: Database, tmp_path: Path) -> None:
    store = Store(sqlite_database)
    marker = "zanzibar-7Q2-secret-holiday"
    await _chat(store, "telegram:1")
    conversation = await store.start_conversation(
        source="real", platform="telegram", task="travel", chat_key="c", user_key="telegram:2"
    )
    await store.append_turn(conversation.id, "user", f"I dream of {marker}")
    await store.record_feedback(conversation_id=conversation.id, user_key="telegram:2", kind="text", text=marker)
    files = [tmp_path / "reverie.db", tmp_path / "reverie.db-wal"]
    assert any(marker.encode() in f.read_bytes() for f in files if f.exists())  # the probe can see it
    assert await store.forget_user("telegram:2") == 1
    assert [f.name for f in files if f.exists() and marker.encode() in f.read_bytes()] == []
    assert len(await store.dialogues_for_training()) == 1  # the other user's data is intact


async def test_status_values_are_checked(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.start_conversation(source="made-up", platform="console", task="travel")
    conversation = await store.start_conversation(source="real", platform="console", task="travel")
    closed = await store.close_conversation(conversation.id, status=ConversationStatus.EXPIRED)
    assert closed.status == ConversationStatus.EXPIRED and closed.reward is None


async def test_migrations_match_the_models(database: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    def ours(name: str | None, type_: str, parent: object) -> bool:
        # APScheduler keeps its job table in the same database (bot/scheduler.py); it is not ours to migrate
        return not (type_ == "table" and name == "apscheduler_jobs")

    def diff() -> list:
        with database.sync_engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"include_name": ours})
            return compare_metadata(context, SQLModel.metadata)

    assert await asyncio.to_thread(diff) == []
    from alembic.script import ScriptDirectory

    from storage.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(database.url)).get_current_head()
    with database.sync_engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar() == head == "0002"


def test_unavailable_error_names_the_operation() -> None:
    assert issubclass(DatabaseUnavailableError, RuntimeError)


async def test_dialogue_records_round_trip_through_json(store: Store) -> None:
    import json

    from storage import DialogueRecord

    await _chat(store, "telegram:9")
    [record] = await store.dialogues_for_training()
    again = DialogueRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.turns[1].text == "Try the Louvre!" and again.turns[1].thumbs == 1.0
    assert again.reward == 1.0 and again.ended_at == record.ended_at
    for bad, message in [
        ({}, "turns"),
        ({"turns": [{"role": "bot", "text": "x"}]}, "role"),
        ({"turns": [{"role": "user"}]}, "text"),
        ({"turns": [{"role": "user", "text": "x"}], "reward": "high"}, "reward"),
    ]:
        with pytest.raises(StoreError, match=message):
            DialogueRecord.from_dict(bad)
