"""Which real conversations enter an improvement run's training set: only rated, consented and not forgotten ones;
a user who ``/forget``s between two runs vanishes from the next run's training set (what the trainer is given, the
run's ``dialogues.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

from bot.events import ChatRef
from bot.improve import ImprovementLoop
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from imagine.simulated.behaviour import generate_and_save
from imagine.task import load_task
from storage import Platform, RunStatus, Source, Store
from tests.test_service import ScriptedPolicy

TASK = load_task("travel")


class _Selected(Exception):
    """Raised by the step hook once the run's training set is written: these tests need nothing after it."""


async def _training_set(loop: ImprovementLoop, data_dir: Path) -> list[dict]:
    """Run the loop up to its training step and return the dialogues it would train on."""
    captured: list[dict] = []

    def on_step(step: str) -> None:
        if step == "train":
            [path] = (data_dir / "runs").glob("run-*/dialogues.jsonl")
            captured.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
            raise _Selected

    loop.on_step = on_step
    run = await loop.run_once(trigger="test")
    assert run.status == RunStatus.FAILED and "_Selected" in run.error
    assert not list((data_dir / "runs").glob("run-*/dialogues.jsonl"))  # the input is deleted when a run ends
    return captured


def _real_texts(dialogues: list[dict]) -> list[str]:
    return sorted(
        turn["text"] for d in dialogues if d["source"] == Source.REAL for turn in d["turns"] if turn["role"] == "user"
    )


async def _chat(service: DialogueService, chat: ChatRef, text: str, rating: str | None) -> None:
    await service.handle_message(chat, text)
    if rating is not None:
        await service.handle_command(chat, "end", rating)


async def test_only_rated_consented_unforgotten_conversations_are_trained_on(
    sqlite_store: Store, tmp_path: Path
) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        base_model="tiny",
        imagine_backend="scripted",
        improve_imagined=0,
        improve_on_first_start=False,
        log_level="WARNING",
    )
    await generate_and_save(sqlite_store, "travel", 4, seed=0)
    service = DialogueService(store=sqlite_store, policies=PolicyHolder(ScriptedPolicy()), task=TASK, settings=settings)
    loop = ImprovementLoop(store=sqlite_store, settings=settings, task=TASK)
    alice, bob, carol = (ChatRef(platform="telegram", chat_id=str(i), user_id=str(i)) for i in (1, 2, 3))
    await _chat(service, alice, "alice: I love museums", "good")
    await _chat(service, bob, "bob: I love hiking", "bad")
    await _chat(service, carol, "carol: never rated", None)  # open, no reward: not training data
    # Imported without consent (e.g. from another system): never training data.
    await sqlite_store.save_dialogue(
        source=Source.REAL,
        platform=Platform.TELEGRAM,
        task=TASK.name,
        turns=[("agent", TASK.opening_line), ("user", "dave: no consent"), ("agent", "ok")],
        reward=1.0,
        user_key="telegram:4",
    )
    await _consent_off(sqlite_store, "telegram:4")

    first = await _training_set(loop, tmp_path)
    assert _real_texts(first) == ["alice: I love museums", "bob: I love hiking"]
    assert sum(d["source"] == Source.IMAGINED for d in first) == 4

    # Between the runs: Alice asks to be forgotten, then talks again and rates it; Bob has a new rated chat too.
    assert "deleted 1 conversation" in (await service.handle_command(alice, "forget"))[0].text
    await _chat(service, alice, "alice: after forgetting", "good")
    await _chat(service, bob, "bob: second chat", "good")

    second = await _training_set(loop, tmp_path)
    assert _real_texts(second) == ["bob: I love hiking", "bob: second chat"]
    assert not any("alice" in turn["text"] for d in second for turn in d["turns"])
    assert (await sqlite_store.last_training_run()).n_real == 2
    await service.shutdown()


async def _consent_off(store: Store, user_key: str) -> None:
    from sqlmodel import select

    from storage import Conversation

    async with store.database.session() as session:
        for conversation in (await session.exec(select(Conversation).where(Conversation.user_key == user_key))).all():
            conversation.consent = False
            session.add(conversation)
