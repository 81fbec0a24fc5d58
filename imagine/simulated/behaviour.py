"""Scripted behaviour agents of varying skill, and the ``scripted`` source of imagined dialogues.

A :class:`Behaviour` decides, from how many preferences it already knows, whether to commit to a final act now
(guessing what it does not know) or to ask about one more. It plays in the task's compiled world
(:func:`imagine.world.world_for`), so every task has one, a user's TOML file included. Mixing behaviours gives
suboptimal data in which the optimal behaviour (use what the user said, answer a side question and steer back,
ask the rest, then act) is present but rare, so "offline RL learns more than the data shows" is measurable
objectively and offline. Imagined dialogues use only the training split of value combinations and phrasings.

:class:`BehaviourPolicy` plays a behaviour behind the same interface as ``learning.interface.Policy``
(``respond_batch``/``respond``/``close``/``version_id``/``name``), without importing ``learning``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagine.conversation import SCRIPTED_REWARD_SOURCE, MessageLike, Utterance, stable_rng
from imagine.task import TaskSpec
from imagine.world import Split, TaskWorld, world_for
from storage import DialogueRecord, Store, TurnRecord

#: A task given as its spec, a built-in name or the path of its TOML file.
TaskRef = TaskSpec | str | Path


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a scripted agent plays.

    ``act_probability[k]`` is the chance of committing to a final act when ``k`` preferences are known (the
    last entry applies to larger ``k``); knowing every preference always acts. ``off_topic_probability`` is
    the chance of a small-talk turn the user does not understand (wastes a turn). ``listens`` is the chance of
    using what the user volunteered (otherwise it asks only about what it has not asked yet, which may re-ask);
    ``answers_side_questions`` the chance of answering a user's side question before its next move.
    """

    name: str
    act_probability: tuple[float, ...]
    off_topic_probability: float = 0.0
    listens: float = 1.0
    answers_side_questions: float = 1.0
    description: str = ""

    def probability_to_act(self, known: int, total: int) -> float:
        """The chance of acting now, knowing ``known`` of ``total`` attributes."""
        if known >= total:
            return 1.0
        return self.act_probability[min(known, len(self.act_probability) - 1)]


BEHAVIOURS: dict[str, Behaviour] = {
    behaviour.name: behaviour
    for behaviour in (
        Behaviour(
            "careful",
            (0.0,),
            description="uses what the user said, answers side questions, asks the rest, then acts (optimal)",
        ),
        Behaviour(
            "eager",
            (0.5, 1.0),
            listens=0.6,
            answers_side_questions=0.5,
            description="acts after 0-1 questions, guessing the rest",
        ),
        Behaviour(
            "sloppy",
            (0.0, 0.25, 1.0),
            listens=0.5,
            answers_side_questions=0.5,
            description="asks one or two questions, then guesses the rest; often re-asks what was volunteered",
        ),
        Behaviour(
            "chatty",
            (0.0, 0.1, 0.6),
            off_topic_probability=0.3,
            listens=0.7,
            answers_side_questions=0.7,
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
    world: TaskWorld, behaviour: Behaviour, history: Sequence[MessageLike], rng: random.Random
) -> str:
    """What ``behaviour`` says next after ``history`` (empty history: the task's opening line)."""
    if not history:
        return world.spec.opening_line
    known = world.known_from_history(history)
    side = world.side_question_in(history[-1].text) if history[-1].role == "user" else None
    answer = ""
    if side is not None and rng.random() < behaviour.answers_side_questions:
        answer = f"{side.reply()} "
    total = len(world.attribute_names)
    if rng.random() < behaviour.probability_to_act(len(known), total):
        return answer + world.compose_act(known, rng)
    if behaviour.off_topic_probability and rng.random() < behaviour.off_topic_probability:
        return answer + rng.choice(OFF_TOPIC)
    unknown = [name for name in world.attribute_names if name not in known]
    if rng.random() >= behaviour.listens:
        # not listening: it asks about whatever it has not asked yet, volunteered or not
        asked = {name for m in history if m.role == "agent" for name in world.asked_attributes(m.text)}
        unknown = [name for name in world.attribute_names if name not in asked] or unknown
    return answer + world.ask(rng.choice(unknown), rng)


class BehaviourPolicy:
    """A scripted behaviour agent that satisfies ``learning.interface.Policy`` structurally.

    Replies depend only on the history and the seed, so it is deterministic and needs no state per episode.
    """

    version_id: int | None = None

    def __init__(self, task: TaskRef, behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}: choose one of {', '.join(BEHAVIOURS)}")
        self.world = world_for(task)
        self.behaviour = BEHAVIOURS[behaviour]
        self.name = f"scripted:{behaviour}"
        self._closed = False

    def respond_batch(self, histories: Sequence[Sequence[MessageLike]], *, seed: int | None = None) -> list[str]:
        """One agent reply per history."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        return [
            next_agent_utterance(self.world, self.behaviour, history, _history_rng(seed, self.behaviour.name, history))
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
    task: TaskRef,
    behaviour: str,
    persona: Mapping[str, Any],
    *,
    seed: object,
    max_turns: int | None = None,
    phrasings: Split = "train",
) -> tuple[list[Utterance], float, str]:
    """One episode of a behaviour agent with a simulated user of the task's world: (turns, reward, outcome)."""
    world = world_for(task)
    user = world.make_user(persona, seed=("episode", seed), max_turns=max_turns, phrasings=phrasings)
    rng = stable_rng("agent", world.name, behaviour, seed)
    turns: list[Utterance] = []
    while not user.done:
        agent_text = next_agent_utterance(world, BEHAVIOURS[behaviour], turns, rng)
        turns.append(Utterance("agent", agent_text))
        turns.append(Utterance("user", user.respond(agent_text).text))
    return turns, float(user.reward or 0.0), user.outcome or "turn_limit"


def generate_scripted_dialogues(
    task: TaskRef, n: int, seed: int, mix: Mapping[str, float] | None = None
) -> list[DialogueRecord]:
    """``n`` suboptimal dialogues of scripted behaviour agents with simulated users, reproducible from ``seed``.

    Personas come from the training split of value combinations and users speak training phrasings only
    (evaluation holds the rest out). Records have source ``"imagined"``, platform ``"imagined"``, the hidden
    persona, reward 0/1 and meta ``{"generator": "scripted", "behaviour": name, "outcome": ...}``. Each dialogue
    starts with the agent's opening line and ends with the user's reaction.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    weights = validate_mix(mix)
    world = world_for(task)
    records: list[DialogueRecord] = []
    for index in range(n):
        rng = stable_rng("generate", world.name, seed, index)
        behaviour = _choose_behaviour(weights, rng)
        persona = world.sample_persona(rng, split="train")
        turns, reward, outcome = play_scripted_episode(world.spec, behaviour, persona, seed=f"{seed}:{index}")
        records.append(
            DialogueRecord(
                id=None,
                source="imagined",
                task=world.name,
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
    store: Store, task: TaskRef, n: int, seed: int, mix: Mapping[str, float] | None = None
) -> list[int]:
    """Generate ``n`` scripted dialogues and store them; returns their conversation ids."""
    return await save_scripted_dialogues(store, generate_scripted_dialogues(task, n, seed, mix))


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
