"""What every simulated conversation is made of: utterances, a user's turn, the simulated-user interface, the
agent's final act and seeded randomness (shared by the compiled worlds, LLM users and scripted agents)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

#: ``reward_source`` stored with episodes scored by a scripted user.
SCRIPTED_REWARD_SOURCE = "scripted_user"


def stable_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from ``parts``: the same parts give the same stream in every process."""
    return random.Random(":".join(str(part) for part in parts))


@runtime_checkable
class MessageLike(Protocol):
    """Anything with ``.role`` (``"user"`` | ``"agent"``) and ``.text``: ``learning.interface.Message``,
    ``storage.TurnRecord`` or :class:`imagine.conversation.Utterance`."""

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
class FinalAct:
    """What the agent committed to (for a compiled world: the act's text); ``hedged`` when it named several options."""

    key: Any
    hedged: bool = False
