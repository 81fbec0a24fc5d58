"""A simulated user of a compiled world (implements ``imagine.simulated.SimulatedUser``).

It plays one persona. Asked about a preference, it answers in one of its phrasings (the first answer is sometimes
vague, a flexible user says "you pick"); it sometimes volunteers a preference nobody asked about, and sometimes asks
a side question, which the agent must answer (briefly) in its next reply, or the user insists and that turn is
lost. A final act ends the episode: reward 1 when the judge finds it fits the persona, else 0; so does running out
of turns (0). ``re_asked`` records whether the agent asked for a value the user had already given.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from imagine.conversation import FinalAct, UserTurn
from imagine.world import phrases
from imagine.world.splits import Split, split_items

if TYPE_CHECKING:
    from imagine.world.world import SideQuestion, TaskWorld


class WorldUser:
    """A deterministic user with a hidden persona; ``respond`` is synchronous, ``reply``/``score`` async."""

    def __init__(
        self, world: TaskWorld, persona: dict[str, str], rng: random.Random, max_turns: int, phrasings: Split
    ) -> None:
        from imagine.world.world import ANY

        self.world = world
        self.persona: dict[str, Any] = dict(persona)
        self.persona_type = world.persona_type(persona)
        self.max_turns = max_turns
        self.phrasings = phrasings
        self._rng = rng
        habits = world.habits
        trait_rates = [
            rate
            for trait in world.traits
            if persona.get(trait.name) in trait.value_names
            and (rate := trait.value(persona[trait.name]).volunteer) is not None
        ]
        self._volunteer = trait_rates[0] if trait_rates else habits.volunteer
        definite = [a.name for a in world.preferences if persona[a.name] != ANY]
        self._vague = {rng.choice(definite)} if definite and rng.random() < habits.vague else set()
        sides = split_items(world.side_questions, phrasings)
        self._side: SideQuestion | None = rng.choice(sides) if sides and rng.random() < habits.side_question else None
        self._side_turn = rng.randint(2, max(2, max_turns - 2))
        self._pending_side: SideQuestion | None = None
        self._agent_turns = 0
        self._revealed: set[str] = set()
        self._understood_once = False
        self.done = False
        #: 1.0 / 0.0 once the episode is over, ``None`` while it runs.
        self.reward: float | None = None
        #: Why the episode ended: ``"fit"``, ``"misfit"``, ``"hedged"``, ``"turn_limit"`` or ``None``.
        self.outcome: str | None = None
        #: Whether the agent asked for a value this user had already given.
        self.re_asked = False

    def respond(self, agent_text: str) -> UserTurn:
        """React to one agent utterance; after ``done`` further calls raise ``RuntimeError``."""
        if self.done:
            raise RuntimeError("the episode is over")
        self._agent_turns += 1
        insisting = self._pending_side is not None and not self._pending_side.is_answered_by(agent_text)
        if not insisting:
            self._pending_side = None
        act = self.world.final_act(agent_text)
        if act is not None:
            return self._finish(act)
        asked = self.world.asked_attributes(agent_text)
        parts: list[str] = []
        if insisting and self._pending_side is not None:
            parts.append(self._rng.choice(phrases.UNANSWERED_SIDE_PREFIXES) + self._pending_side.question)
        elif asked:
            self._understood_once = True
            parts.extend(self._answer(name) for name in asked)
            parts.extend(self._maybe_volunteer())
        elif not self._understood_once:
            self._understood_once = True
            parts.append(self._rng.choice(split_items(self.world.user_openings, self.phrasings)))
            parts.extend(self._maybe_volunteer())
        else:
            parts.append(self._rng.choice(phrases.CONFUSED_REPLIES))
        if self._side is not None and not insisting and self._agent_turns >= self._side_turn:
            parts.append("By the way, " + self._side.question[0].lower() + self._side.question[1:])
            self._pending_side, self._side = self._side, None
        if self._agent_turns >= self.max_turns:
            return self._end(0.0, "turn_limit", self._rng.choice(phrases.TIMEOUT_REPLIES))
        return UserTurn(" ".join(parts))

    async def reply(self, agent_text: str) -> UserTurn:
        """``SimulatedUser`` interface: :meth:`respond`."""
        return self.respond(agent_text)

    async def score(self) -> float:
        """The reward; an episode cut off before the user ended it scores 0."""
        return self.reward if self.reward is not None else 0.0

    def _answer(self, name: str) -> str:
        from imagine.world.world import ANY

        attribute = self.world.attribute(name)
        value = self.persona[name]
        if name in self._revealed:
            self.re_asked = True
            prefix = self._rng.choice(phrases.REPEAT_PREFIXES)
            answer = self._value_text(name, value)
            keep_case = answer.split(" ", 1)[0].split("'", 1)[0] == "I"
            return prefix + (answer if keep_case else answer[0].lower() + answer[1:])
        if name in self._vague:
            self._vague.discard(name)
            return self._rng.choice(phrases.VAGUE_REPLIES).format(dimension=attribute.name)
        self._revealed.add(name)
        if value == ANY:
            return self._rng.choice(phrases.FLEXIBLE_REPLIES).format(dimension=attribute.name)
        return self._value_text(name, value)

    def _value_text(self, name: str, value: str) -> str:
        from imagine.world.world import ANY

        if value == ANY:
            return phrases.FLEXIBLE_REPLIES[0].format(dimension=name)
        return self._rng.choice(self.world.says(name, value, self.phrasings))

    def _maybe_volunteer(self) -> list[str]:
        from imagine.world.world import ANY

        unrevealed = [
            a.name
            for a in self.world.preferences
            if a.name not in self._revealed and self.persona[a.name] != ANY and a.name not in self._vague
        ]
        if not unrevealed or self._rng.random() >= self._volunteer:
            return []
        name = self._rng.choice(unrevealed)
        self._revealed.add(name)
        return [self._value_text(name, self.persona[name])]

    def _finish(self, act: FinalAct) -> UserTurn:
        if act.hedged:
            return self._end(0.0, "hedged", self._rng.choice(phrases.HEDGE_REPLIES))
        if self.world.act_fits(self.persona, act):
            return self._end(1.0, "fit", self._rng.choice(phrases.SUCCESS_REPLIES))
        return self._end(0.0, "misfit", self._rng.choice(phrases.FAILURE_REPLIES))

    def _end(self, reward: float, outcome: str, text: str) -> UserTurn:
        self.done, self.reward, self.outcome = True, reward, outcome
        return UserTurn(text, done=True)
