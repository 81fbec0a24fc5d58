"""What the rest of Reverie sees of a policy: a history of messages in, one agent reply out.

Every kind of policy (prompted base model, BC, filtered BC, token-level ILQL, utterance-level ILQL)
implements :class:`Policy`, so the bot, the evaluator and the improvement loop never care which it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Speaker = Literal["user", "agent"]

#: How every policy decodes a reply unless told otherwise (decoding, ``load_policy``, the bot's settings): at
#: most this many new tokens, this temperature (0: greedy), from the top-k tokens. Greedy because the agent is
#: goal-directed: on travel (development personas, 100 episodes) the critic-awr policy succeeded 93 % greedy,
#: 84 % at 0.3 and 66 % at 0.7 — sampling adds repeated questions and wrong guesses the policy itself ranks
#: below its best reply. Imagination samples with its own temperatures.
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_K = 20


@dataclass(frozen=True, slots=True)
class Message:
    """One utterance of a dialogue as a policy sees it."""

    role: Speaker
    text: str


History = Sequence[Message]


@runtime_checkable
class Policy(Protocol):
    """A dialogue agent.

    ``respond_batch`` is the batched, blocking call (evaluation, benchmarks); ``respond`` is the one the
    bot awaits: concurrent calls are micro-batched into one ``respond_batch`` off the event loop.
    """

    #: ``PolicyVersion.id`` in storage, or ``None`` for the untrained prompted base model.
    version_id: int | None
    #: A short label for logs and reports, e.g. ``"base"``, ``"ilql#4"``.
    name: str

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        """One agent reply per history (each history ends with a user message or is empty)."""
        ...

    async def respond(self, history: History) -> str:
        """One agent reply, awaitable; concurrent calls share batched generation."""
        ...

    def close(self) -> None:
        """Stop background workers and free memory; further calls raise."""
        ...
