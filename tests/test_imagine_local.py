"""The local backend with a tiny random model: batching, loading from a directory, turn-by-turn imagination."""

from __future__ import annotations

import asyncio
import itertools
import re
from pathlib import Path

import pytest

from imagine.backends import BackendError, ChatBackend, make_backend
from imagine.backends.local import LocalBackend
from imagine.engine import ImaginationEngine, ImagineConfig
from imagine.task import load_task
from learning.base_model import tiny_model
from storage import Store


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return tiny_model()


async def test_concurrent_requests_share_one_batch(tiny: tuple) -> None:
    chat = make_backend("local", model=tiny, model_name="tiny", batch_window_s=0.05, seed=3)
    assert isinstance(chat, LocalBackend) and isinstance(chat, ChatBackend)
    assert (chat.name, chat.model, chat.writes_whole_dialogues) == ("local", "tiny", False)
    prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i}"}] for i in range(5)]
    replies = await asyncio.gather(*(chat.complete(p, max_tokens=5) for p in prompts))
    assert len(replies) == 5 and all(isinstance(r, str) for r in replies)
    assert chat._batches == 1  # five callers, one generate()
    assert chat.usage.requests == 5 and 0 < chat.usage.completion_tokens <= 25 and chat.usage.prompt_tokens > 5 * 5
    # Different sampling settings are not mixed into one batch.
    await asyncio.gather(chat.complete(prompts[0], max_tokens=3), chat.complete(prompts[1], max_tokens=4))
    assert chat._batches == 3
    await chat.aclose()
    with pytest.raises(BackendError, match="closed"):
        await chat.complete(prompts[0])


async def test_greedy_generation_is_deterministic_across_batch_sizes(tiny: tuple) -> None:
    chat = LocalBackend(tiny, batch_window_s=0.02)
    prompt = [{"role": "user", "content": "tell me about travel"}]
    alone = await chat.complete(prompt, max_tokens=6, temperature=0.0)
    together = await asyncio.gather(
        chat.complete(prompt, max_tokens=6, temperature=0.0),
        chat.complete([{"role": "user", "content": "a much longer prompt about the museum and the beach"}],
                      max_tokens=6, temperature=0.0),
    )  # fmt: skip
    assert together[0] == alone  # left padding keeps a padded row's output unchanged
    await chat.aclose()


async def test_loads_a_model_directory(tiny: tuple, tmp_path: Path) -> None:
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    chat = make_backend("local", model=str(tmp_path / "m"))
    assert chat.model == str(tmp_path / "m")
    assert isinstance(await chat.complete([{"role": "user", "content": "hi"}], max_tokens=3), str)
    await chat.aclose()
    with pytest.raises(BackendError, match="not a model directory"):
        make_backend("local", model=str(tmp_path / "nothing"))


async def test_turn_by_turn_imagination_stores_alternating_dialogues(tiny: tuple, sqlite_store: Store) -> None:
    task = load_task("travel").model_copy(update={"max_turns": 4})
    chat = LocalBackend(tiny, model_name="tiny", seed=1)
    config = ImagineConfig(critique=False, concurrency=2, seed=5, run_id="tiny", turn_max_tokens=4)
    report = await ImaginationEngine(task, chat, store=sqlite_store, config=config).run(4)
    await chat.aclose()
    assert report.accepted + sum(report.rejected.values()) == report.attempts
    assert report.accepted == 4, report.rejected
    stored = await sqlite_store.dialogues_for_training(sources=["imagined"], task="travel")
    assert len(stored) == 4
    for record in stored:
        roles = [t.role for t in record.turns]
        assert roles[0] == "agent" and roles[-1] == "user"
        assert all(a != b for a, b in itertools.pairwise(roles))  # strictly alternating
        assert record.turns[0].text == task.opening_line
        assert sum(r == "agent" for r in roles) <= task.max_turns
        assert record.meta["mode"] == "turns" and record.meta["backend"] == "local" and record.meta["model"] == "tiny"
        assert record.persona is not None and record.persona["origin"] == "hints"
    assert len({r.meta["persona_key"] for r in stored}) == 4
    # A failing agent (reward 0) acts after at most one question; a successful one asks two (all the room that
    # max_turns 4 leaves besides the opening line and the act) before acting.
    # (the stored reward is the world's judgement of the tiny model's babble; the plan follows the intended one)
    agent_turns = {(r.meta["intended_reward"], sum(t.role == "agent" for t in r.turns)) for r in stored}
    assert {reward for reward, _ in agent_turns} == {0, 1}
    assert all(n == 4 if reward == 1 else n <= 3 for reward, n in agent_turns)
    assert all(r.meta["judge"] == "world" and r.reward == 0.0 for r in stored)


class RoleplayChat:
    """A deterministic chat backend for turn mode: answers by the role prompt it is given, slipping sometimes."""

    name = "roleplay"
    model = "roleplay-1"
    writes_whole_dialogues = False

    def __init__(self) -> None:
        from imagine.backends import Usage

        self.usage = Usage()
        self.calls = 0

    async def complete(self, messages, *, max_tokens=256, temperature=0.8, json_mode=False) -> str:
        self.calls += 1
        system = messages[0]["content"]
        if "You are the customer" in system:
            if self.calls % 3 == 0:
                return "Welcome to my shop! How can I help you today?"  # role confusion: must be regenerated
            if "pleased" in system:
                return "That sounds perfect, thank you!"
            if "disappointed" in system:
                return "Hmm, I would do whatever, but that is not for me."
            return f"User: I like quiet places, answer {self.calls}.\nAgent: (the model runs on)"
        if "Ask one short question" in system:
            topic = re.search(r"question about the user's ([^.]+)\.", system)
            return f"What about your {topic.group(1) if topic else 'plans'}?"
        return f"I recommend a sunset kayak tour ({self.calls})."

    async def aclose(self) -> None:
        return None


async def test_turn_mode_follows_the_outcome_plan_and_revises_bad_turns() -> None:
    task = load_task("travel")
    chat = RoleplayChat()
    report = await ImaginationEngine(task, chat, config=ImagineConfig(concurrency=4, seed=3)).run(12)
    assert report.accepted == 12 and not report.rejected
    for dialogue in report.dialogues:
        roles = [role for role, _ in dialogue.turns]
        texts = [text for _, text in dialogue.turns]
        assert all(a != b for a, b in itertools.pairwise(roles)) and roles[-1] == "user"
        assert not any("How can I help" in t or "Agent:" in t or "model runs on" in t for t in texts)
        questions = sum(t.startswith("What about your") for t in texts)
        if dialogue.meta["intended_reward"] == 1:  # the stored reward is the world judge's verdict on the act
            assert texts[-1] == "That sounds perfect, thank you!" and 2 <= questions <= 3
        else:
            assert "not for me" in texts[-1] and questions <= 1
        assert texts[-2].startswith("I recommend")
    assert any("regenerated_user_turn" in d.meta["repairs"] for d in report.dialogues)
    assert {d.meta["intended_reward"] for d in report.dialogues} == {0, 1}
