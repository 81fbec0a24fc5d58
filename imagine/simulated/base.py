"""The machinery shared by scripted simulated users: hidden attributes, intent matching, the user itself.

A scripted task (travel, teaching) is a set of hidden :class:`Attribute` s plus a *final act* the agent
commits to (a recommendation, an explanation). The :class:`ScriptedUser` plays one persona: it answers a
question about an attribute (recognised by keywords, across paraphrases) with a paraphrased answer that
reveals that attribute only, replies neutrally to anything it does not understand, and ends the episode
when the agent commits to a final act (reward 1 if it fits the persona, else 0) or runs out of turns (0).
Everything is seeded: the same seed gives the same personas and the same paraphrases.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: ``reward_source`` stored with episodes scored by a scripted user.
SCRIPTED_REWARD_SOURCE = "scripted_user"


def stable_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from ``parts``: the same parts give the same stream in every process."""
    return random.Random(":".join(str(part) for part in parts))


@runtime_checkable
class MessageLike(Protocol):
    """Anything with ``.role`` (``"user"`` | ``"agent"``) and ``.text``: ``learning.interface.Message``,
    ``storage.TurnRecord`` or :class:`imagine.simulated.base.Utterance`."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class Utterance:
    """One turn of a simulated episode."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A simulated user's reply; ``done`` ends the episode (the user's reward is then final)."""

    text: str
    done: bool = False


@runtime_checkable
class SimulatedUser(Protocol):
    """A user with a hidden persona that talks to an agent and scores the episode at the end."""

    #: The hidden persona (JSON-ready), stored with evaluation episodes.
    persona: dict[str, Any]
    #: A short label for per-persona breakdowns in reports, e.g. ``"food"`` or ``"beginner"``.
    persona_type: str

    async def reply(self, agent_text: str) -> UserTurn:
        """The user's answer to one agent utterance."""
        ...

    async def score(self) -> float:
        """The episode's reward in [0, 1]; call once the episode is over (``done`` or the turn limit)."""
        ...


@dataclass(frozen=True, slots=True)
class Attribute:
    """One hidden persona attribute: its values, how users recognise a question about it, how agents ask it
    and how users answer it.

    ``answers`` maps each value to paraphrased answers; every answer must be specific to its value (scripted
    agents read answers back by exact phrase match, see :meth:`ScriptedTask.read_answers`).
    """

    name: str
    values: tuple[str, ...]
    question_pattern: re.Pattern[str]
    questions: tuple[str, ...]
    answers: Mapping[str, tuple[str, ...]]
    #: value → pattern of free-form wording for it (``"foodie|cuisine"``): lets scripted agents understand
    #: users that do not speak in the templates (LLM users). Optional; used only when no template matches.
    value_keywords: Mapping[str, re.Pattern[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [value for value in self.values if not self.answers.get(value)]
        if missing:
            raise ValueError(f"attribute {self.name!r}: no answers for {missing}")
        for question in self.questions:
            if not self.question_pattern.search(question.lower()):
                raise ValueError(f"attribute {self.name!r}: own question {question!r} is not recognised")


@dataclass(frozen=True, slots=True)
class FinalAct:
    """What the agent committed to: a catalogue item key (``None`` when it named several, i.e. hedged)."""

    key: Any
    hedged: bool = False


class ScriptedTask(ABC):
    """A task with hidden attributes and an objective reward, played by :class:`ScriptedUser`.

    Subclasses define the attributes, the replies and three task-specific parts: :meth:`final_act`
    (did the agent commit, and to what), :meth:`act_fits` (the reward) and :meth:`compose_act`
    (how a scripted agent phrases a final act from what it knows, guessing the rest).
    """

    name: str
    attributes: tuple[Attribute, ...]
    #: The user's reply to an utterance it does not understand, the first time (the agent's opening).
    intro_replies: tuple[str, ...]
    #: The user's reply to an utterance it does not understand, later.
    confused_replies: tuple[str, ...]
    success_replies: tuple[str, ...]
    failure_replies: tuple[str, ...]
    hedge_replies: tuple[str, ...]
    timeout_replies: tuple[str, ...]
    #: Prefixes for an answer to a question already answered.
    repeat_prefixes: tuple[str, ...] = ("As I said, ", "Like I mentioned, ", "Again, ")

    # --- personas ------------------------------------------------------------------------------------

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """Names of the hidden attributes, in a fixed order."""
        return tuple(attribute.name for attribute in self.attributes)

    def attribute(self, name: str) -> Attribute:
        """The attribute called ``name``."""
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(f"{self.name}: no attribute {name!r}")

    def sample_persona(self, rng: random.Random) -> dict[str, str]:
        """A persona drawn uniformly from the attribute values."""
        return {attribute.name: rng.choice(attribute.values) for attribute in self.attributes}

    def sample_personas(self, n: int, seed: int) -> list[dict[str, str]]:
        """``n`` personas, reproducible from ``seed``."""
        return [self.sample_persona(stable_rng("persona", self.name, seed, index)) for index in range(n)]

    def persona_type(self, persona: Mapping[str, Any]) -> str:
        """The label reports group personas by (the first attribute's value)."""
        return str(persona.get(self.attributes[0].name, "unknown"))

    def describe_persona(self, persona: Mapping[str, Any]) -> str:
        """The persona in plain words, for an LLM user's hidden prompt."""
        return "; ".join(f"{name}: {persona[name]}" for name in self.attribute_names if name in persona)

    def validate_persona(self, persona: Mapping[str, Any]) -> dict[str, str]:
        """The persona restricted to this task's attributes; ``ValueError`` names a missing or unknown value."""
        checked: dict[str, str] = {}
        for attribute in self.attributes:
            value = persona.get(attribute.name)
            if value not in attribute.values:
                raise ValueError(
                    f"{self.name} persona: {attribute.name}={value!r} is not one of {', '.join(attribute.values)}"
                )
            checked[attribute.name] = str(value)
        return checked

    # --- understanding -------------------------------------------------------------------------------

    def asked_attributes(self, agent_text: str) -> list[str]:
        """Which attributes an agent utterance asks about (keyword/intent level, paraphrase tolerant)."""
        lowered = agent_text.lower()
        return [a.name for a in self.attributes if a.question_pattern.search(lowered)]

    def read_answers(self, user_text: str) -> dict[str, str]:
        """Attribute values a user's reply reveals.

        Exact phrase match on the answer templates (what scripted users say). Only for a reply with no
        template at all that is not one of the scripted user's canned replies (what LLM users say): free-form
        wording via ``value_keywords``, for each attribute where exactly one value matches.
        """
        lowered = user_text.lower()
        found: dict[str, str] = {}
        for attribute in self.attributes:
            for value in attribute.values:
                if any(answer.lower() in lowered for answer in attribute.answers[value]):
                    found[attribute.name] = value
        if found or lowered.strip() in self._canned_replies():
            return found
        for attribute in self.attributes:
            matching = [v for v, pattern in attribute.value_keywords.items() if pattern.search(lowered)]
            if len(matching) == 1:
                found[attribute.name] = matching[0]
        return found

    def _canned_replies(self) -> frozenset[str]:
        replies = (
            *self.intro_replies,
            *self.confused_replies,
            *self.success_replies,
            *self.failure_replies,
            *self.hedge_replies,
            *self.timeout_replies,
        )
        return frozenset(reply.lower() for reply in replies)

    def known_from_history(self, history: Sequence[MessageLike]) -> dict[str, str]:
        """Everything the user has revealed in a history (what a scripted agent knows)."""
        known: dict[str, str] = {}
        for message in history:
            if message.role == "user":
                known.update(self.read_answers(message.text))
        return known

    @abstractmethod
    def final_act(self, agent_text: str) -> FinalAct | None:
        """The final act in an agent utterance, or ``None`` when it does not commit to one."""

    @abstractmethod
    def act_fits(self, persona: Mapping[str, Any], act: FinalAct) -> bool:
        """Whether a final act fits the persona (the objective reward)."""

    @abstractmethod
    def compose_act(self, known: Mapping[str, str], rng: random.Random) -> str:
        """A scripted agent's final utterance given what it knows; unknown attributes are guessed."""

    def best_act(self, persona: Mapping[str, Any], rng: random.Random) -> str:
        """The final utterance of an agent that knows everything (the optimum)."""
        return self.compose_act({name: str(persona[name]) for name in self.attribute_names}, rng)

    def ask(self, attribute: str, rng: random.Random) -> str:
        """A paraphrased question about one attribute."""
        return rng.choice(self.attribute(attribute).questions)

    # --- users ---------------------------------------------------------------------------------------

    def make_user(self, persona: Mapping[str, Any], *, seed: object = 0, max_turns: int = 6) -> ScriptedUser:
        """A scripted user playing ``persona``; ``seed`` fixes its paraphrase choices."""
        return ScriptedUser(self, self.validate_persona(persona), stable_rng("user", self.name, seed), max_turns)


class ScriptedUser:
    """A deterministic user with a hidden persona (implements :class:`SimulatedUser`).

    ``respond`` is the synchronous call used by scripted generation; ``reply``/``score`` are the async
    :class:`SimulatedUser` interface used by the evaluator.
    """

    def __init__(self, task: ScriptedTask, persona: dict[str, str], rng: random.Random, max_turns: int) -> None:
        self.task = task
        self.persona: dict[str, Any] = dict(persona)
        self.persona_type = task.persona_type(persona)
        self.max_turns = max_turns
        self._rng = rng
        self._agent_turns = 0
        self._revealed: set[str] = set()
        self._understood_once = False
        self.done = False
        #: 1.0 / 0.0 once the episode is over, ``None`` while it runs.
        self.reward: float | None = None
        #: Why the episode ended: ``"fit"``, ``"misfit"``, ``"hedged"``, ``"turn_limit"`` or ``None``.
        self.outcome: str | None = None

    def respond(self, agent_text: str) -> UserTurn:
        """React to one agent utterance; after ``done`` further calls raise ``RuntimeError``."""
        if self.done:
            raise RuntimeError("the episode is over")
        self._agent_turns += 1
        act = self.task.final_act(agent_text)
        if act is not None:
            return self._finish(act)
        asked = self.task.asked_attributes(agent_text)
        if asked:
            self._understood_once = True
            text = " ".join(self._answer(name) for name in asked)
        elif not self._understood_once:
            self._understood_once = True
            text = self._rng.choice(self.task.intro_replies)
        else:
            text = self._rng.choice(self.task.confused_replies)
        if self._agent_turns >= self.max_turns:
            return self._end(0.0, "turn_limit", self._rng.choice(self.task.timeout_replies))
        return UserTurn(text)

    async def reply(self, agent_text: str) -> UserTurn:
        """:class:`SimulatedUser` interface: :meth:`respond`."""
        return self.respond(agent_text)

    async def score(self) -> float:
        """The reward; an episode cut off before the user ended it scores 0."""
        return self.reward if self.reward is not None else 0.0

    def _answer(self, attribute_name: str) -> str:
        attribute = self.task.attribute(attribute_name)
        answer = self._rng.choice(attribute.answers[self.persona[attribute_name]])
        if attribute_name in self._revealed:
            prefix = self._rng.choice(self.task.repeat_prefixes)
            answer = prefix + answer[0].lower() + answer[1:]
        self._revealed.add(attribute_name)
        return answer

    def _finish(self, act: FinalAct) -> UserTurn:
        if act.hedged:
            return self._end(0.0, "hedged", self._rng.choice(self.task.hedge_replies))
        if self.task.act_fits(self.persona, act):
            return self._end(1.0, "fit", self._rng.choice(self.task.success_replies))
        return self._end(0.0, "misfit", self._rng.choice(self.task.failure_replies))

    def _end(self, reward: float, outcome: str, text: str) -> UserTurn:
        self.done, self.reward, self.outcome = True, reward, outcome
        return UserTurn(text, done=True)


def keyword_pattern(*alternatives: str) -> re.Pattern[str]:
    """A case-insensitive pattern matching any of ``alternatives`` (regex fragments) at word starts."""
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")", re.IGNORECASE)
