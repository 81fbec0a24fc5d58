"""Scripted behaviour agents of varying skill, and the ``scripted`` source of imagined dialogues.

A :class:`Behaviour` decides, from how many hidden attributes it already knows, whether to commit to a final
act now (guessing what it does not know) or to ask about one more attribute. Mixing behaviours gives
suboptimal data (~40 % success) in which the optimal behaviour (ask everything, then act) is present but
rare, so "offline RL learns more than the data shows" is measurable objectively and offline.

:class:`BehaviourPolicy` plays a behaviour behind the same interface as ``learning.interface.Policy``
(``respond_batch``/``respond``/``close``/``version_id``/``name``), without importing ``learning``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from imagine.simulated.base import (
    SCRIPTED_REWARD_SOURCE,
    MessageLike,
    ScriptedTask,
    Utterance,
    stable_rng,
)
from imagine.simulated.registry import opening_line, scripted_task
from imagine.task import load_task
from storage import DialogueRecord, Store, TurnRecord


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a scripted agent plays.

    ``act_probability[k]`` is the chance of committing to a final act when ``k`` attributes are known (the
    last entry applies to larger ``k``); knowing every attribute always acts. ``off_topic_probability`` is
    the chance of a small-talk turn the user does not understand (wastes a turn).
    """

    name: str
    act_probability: tuple[float, ...]
    off_topic_probability: float = 0.0
    description: str = ""

    def probability_to_act(self, known: int, total: int) -> float:
        """The chance of acting now, knowing ``known`` of ``total`` attributes."""
        if known >= total:
            return 1.0
        return self.act_probability[min(known, len(self.act_probability) - 1)]


BEHAVIOURS: dict[str, Behaviour] = {
    behaviour.name: behaviour
    for behaviour in (
        Behaviour("careful", (0.0,), description="asks about every attribute, then acts on what it learned (optimal)"),
        Behaviour("eager", (0.5, 1.0), description="acts after 0-1 questions, guessing the rest"),
        Behaviour("sloppy", (0.0, 0.25, 1.0), description="asks one or two questions, then guesses the rest"),
        Behaviour(
            "chatty",
            (0.0, 0.1, 0.6),
            off_topic_probability=0.3,
            description="wanders off topic, sometimes runs out of turns, often guesses",
        ),
    )
}

#: The default mixture: the optimum present but rare; overall success ~40 % on both built-in tasks.
DEFAULT_MIX: dict[str, float] = {"careful": 0.12, "eager": 0.33, "sloppy": 0.40, "chatty": 0.15}

OFF_TOPIC: tuple[str, ...] = (
    "How has your day been?",
    "Have you been here before?",
    "Let me check my notes.",
    "Sounds exciting!",
)


def _history_rng(seed: int | None, behaviour: str, history: Sequence[MessageLike]) -> random.Random:
    # A stable digest of the whole history: the same history and seed always give the same reply.
    digest = hashlib.blake2b(digest_size=8)
    for message in history:
        digest.update(f"{message.role}\x1f{message.text}\x1e".encode())
    return stable_rng("behaviour", behaviour, seed, digest.hexdigest())


def next_agent_utterance(
    task: ScriptedTask, behaviour: Behaviour, history: Sequence[MessageLike], rng: random.Random, opening: str
) -> str:
    """What ``behaviour`` says next after ``history`` (empty history: the task's opening line)."""
    if not history:
        return opening
    known = task.known_from_history(history)
    total = len(task.attributes)
    if rng.random() < behaviour.probability_to_act(len(known), total):
        return task.compose_act(known, rng)
    if behaviour.off_topic_probability and rng.random() < behaviour.off_topic_probability:
        return rng.choice(OFF_TOPIC)
    unknown = [name for name in task.attribute_names if name not in known]
    return task.ask(rng.choice(unknown), rng)


class BehaviourPolicy:
    """A scripted behaviour agent that satisfies ``learning.interface.Policy`` structurally.

    Replies depend only on the history and the seed, so it is deterministic and needs no state per episode.
    """

    version_id: int | None = None

    def __init__(self, task_name: str, behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}: choose one of {', '.join(BEHAVIOURS)}")
        self.task = scripted_task(task_name)
        self.behaviour = BEHAVIOURS[behaviour]
        self.name = f"scripted:{behaviour}"
        self._opening = opening_line(task_name)
        self._closed = False

    def respond_batch(self, histories: Sequence[Sequence[MessageLike]], *, seed: int | None = None) -> list[str]:
        """One agent reply per history."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        return [
            next_agent_utterance(
                self.task, self.behaviour, history, _history_rng(seed, self.behaviour.name, history), self._opening
            )
            for history in histories
        ]

    async def respond(self, history: Sequence[MessageLike]) -> str:
        """One agent reply, awaitable."""
        return self.respond_batch([history])[0]

    def close(self) -> None:
        """Further calls raise."""
        self._closed = True


def _choose_behaviour(mix: Mapping[str, float], rng: random.Random) -> str:
    names = list(mix)
    return rng.choices(names, weights=[mix[name] for name in names])[0]


def validate_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    """The behaviour mixture to use; ``ValueError`` names an unknown behaviour or a bad weight."""
    chosen = dict(DEFAULT_MIX if mix is None else mix)
    unknown = [name for name in chosen if name not in BEHAVIOURS]
    if unknown:
        raise ValueError(f"unknown behaviours {unknown}: choose from {', '.join(BEHAVIOURS)}")
    if any(weight < 0 for weight in chosen.values()) or sum(chosen.values()) <= 0:
        raise ValueError(f"mix weights must be non-negative and not all zero: {chosen}")
    return chosen


def play_scripted_episode(
    task_name: str, behaviour: str, persona: Mapping[str, Any], *, seed: object, max_turns: int | None = None
) -> tuple[list[Utterance], float, str]:
    """One episode of a behaviour agent with a scripted user: (turns, reward, outcome)."""
    task = scripted_task(task_name)
    limit = max_turns if max_turns is not None else _max_turns(task_name)
    user = task.make_user(persona, seed=("episode", seed), max_turns=limit)
    rng = stable_rng("agent", task_name, behaviour, seed)
    opening = opening_line(task_name)
    turns: list[Utterance] = []
    while not user.done:
        agent_text = next_agent_utterance(task, BEHAVIOURS[behaviour], turns, rng, opening)
        turns.append(Utterance("agent", agent_text))
        turns.append(Utterance("user", user.respond(agent_text).text))
    return turns, float(user.reward or 0.0), user.outcome or "turn_limit"


def generate_scripted_dialogues(
    task_name: str, n: int, seed: int, mix: Mapping[str, float] | None = None
) -> list[DialogueRecord]:
    """``n`` suboptimal dialogues of scripted behaviour agents with scripted users, reproducible from ``seed``.

    Records have source ``"imagined"``, platform ``"imagined"``, the hidden persona, reward 0/1 and meta
    ``{"generator": "scripted", "behaviour": name, "outcome": ...}``. Each dialogue starts with the agent's
    opening line and ends with the user's reaction.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    weights = validate_mix(mix)
    task = scripted_task(task_name)
    records: list[DialogueRecord] = []
    for index in range(n):
        rng = stable_rng("generate", task_name, seed, index)
        behaviour = _choose_behaviour(weights, rng)
        persona = task.sample_persona(rng)
        turns, reward, outcome = play_scripted_episode(task_name, behaviour, persona, seed=f"{seed}:{index}")
        records.append(
            DialogueRecord(
                id=None,
                source="imagined",
                task=task_name,
                turns=tuple(TurnRecord(role=t.role, text=t.text) for t in turns),
                reward=reward,
                persona=dict(persona),
                meta={"generator": "scripted", "behaviour": behaviour, "outcome": outcome},
                platform="imagined",
            )
        )
    return records


async def save_scripted_dialogues(store: Store, records: Sequence[DialogueRecord]) -> list[int]:
    """Store generated dialogues (one transaction each); returns their conversation ids."""
    ids: list[int] = []
    for record in records:
        conversation = await store.save_dialogue(
            source=record.source,
            platform=record.platform or "imagined",
            task=record.task,
            turns=[(turn.role, turn.text) for turn in record.turns],
            reward=record.reward,
            reward_source=SCRIPTED_REWARD_SOURCE,
            persona=record.persona,
            meta=record.meta,
        )
        assert conversation.id is not None
        ids.append(conversation.id)
    return ids


async def generate_and_save(
    store: Store, task_name: str, n: int, seed: int, mix: Mapping[str, float] | None = None
) -> list[int]:
    """Generate ``n`` scripted dialogues and store them; returns their conversation ids."""
    return await save_scripted_dialogues(store, generate_scripted_dialogues(task_name, n, seed, mix))


@cache
def _max_turns(task_name: str) -> int:
    return load_task(task_name).max_turns


__all__ = [
    "BEHAVIOURS",
    "DEFAULT_MIX",
    "Behaviour",
    "BehaviourPolicy",
    "generate_and_save",
    "generate_scripted_dialogues",
    "next_agent_utterance",
    "play_scripted_episode",
    "save_scripted_dialogues",
    "validate_mix",
]
