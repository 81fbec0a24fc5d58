"""The compiled world of one task: what users say, how agents ask and act, and the judge of a final act.

A :class:`TaskWorld` knows every persona dimension (:class:`WorldAttribute`): *preferences* the agent must find out
and the final act must honour, and *traits* that only shape how the user talks. The judge is objective: a final
act fits a persona when, for every preference, it names something that fits the persona's value (a value with no
fits asks for nothing), names nothing that fits another value of that dimension, and contains nothing that
clashes with any of the persona's values. Built by :func:`imagine.world.compile.world_for`.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagine.conversation import FinalAct, MessageLike, stable_rng
from imagine.world import phrases
from imagine.world.splits import HELD_OUT_COMBINATIONS, Split, combination_hash, split_items

if TYPE_CHECKING:
    from imagine.task import TaskSpec
    from imagine.world.user import WorldUser

#: The persona value of a user who has no preference on a dimension ("you pick"): any value honours it. Plain words,
#: so an LLM user reading its persona says the same.
ANY = "no preference"

#: Recognises a reply that leaves a dimension to the agent, whichever dimension the question was about.
_FLEXIBLE_WORDS = re.compile(
    r"\b(?:no preference|you pick|you choose|your call|don't mind|do not mind|doesn't matter|up to you)\b",
    re.IGNORECASE,
)

#: Value spaces up to this size are enumerated to pick held-out combinations exactly.
_ENUMERABLE = 200_000

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def phrase_pattern(phrases_: Sequence[str], *, prefix: bool = False) -> re.Pattern[str] | None:
    """A case-insensitive pattern matching any of ``phrases_`` (literal text) as whole words, or with ``prefix`` at
    word starts only ("kid" also finds "kids", "histor" "history"); ``None`` for no phrases."""
    cleaned = sorted({p.strip().lower() for p in phrases_ if p.strip()}, key=len, reverse=True)
    if not cleaned:
        return None
    parts = [
        (r"\b" if p[0].isalnum() else "") + re.escape(p) + (r"\b" if p[-1].isalnum() and not prefix else "")
        for p in cleaned
    ]
    return re.compile("|".join(parts), re.IGNORECASE)


def _matches(pattern: re.Pattern[str] | None, text: str) -> bool:
    return pattern is not None and pattern.search(text) is not None


@dataclass(frozen=True)
class WorldValue:
    """One value of a dimension: how users say it and what in a final act honours or clashes with it."""

    value: str
    #: Whole replies that give the value (split into training and held-out phrasings).
    says: tuple[str, ...]
    #: Recognises the value in free text (``words`` of the task file, the value's name).
    words: re.Pattern[str] | None
    #: Phrases that honour the value in a final act (empty: the value asks for nothing).
    fits: tuple[str, ...]
    fit_pattern: re.Pattern[str] | None
    clash_pattern: re.Pattern[str] | None
    #: For a trait value: the chance such a user volunteers a preference in a reply (``None``: the world's default).
    volunteer: float | None = None


@dataclass(frozen=True)
class WorldAttribute:
    """One persona dimension of the world."""

    name: str
    role: str  # "preference" | "trait"
    values: tuple[WorldValue, ...]
    questions: tuple[str, ...]
    question_pattern: re.Pattern[str]
    flexible: bool
    #: Recognises a "you pick" reply about this dimension.
    flexible_pattern: re.Pattern[str]

    @property
    def value_names(self) -> tuple[str, ...]:
        """The values in the order the hint lists them."""
        return tuple(v.value for v in self.values)

    def value(self, name: str) -> WorldValue:
        """The :class:`WorldValue` called ``name``."""
        for value in self.values:
            if value.value == name:
                return value
        raise KeyError(f"{self.name}: no value {name!r}")


@dataclass(frozen=True)
class SideQuestion:
    """A question users may ask on the side, with the brief answer a good agent gives before steering back."""

    question: str
    answer: str
    answered: re.Pattern[str]
    #: The answer's own words (no acknowledgement): what a reply that gives the task file's answer contains.
    informed: re.Pattern[str]

    def is_answered_by(self, agent_text: str) -> bool:
        """Whether an agent reply answers it well enough for a user (its answer words or a generic acknowledgement)."""
        return _matches(self.answered, agent_text)

    def is_informed_by(self, agent_text: str) -> bool:
        """Whether an agent reply gives the task file's answer (its answer words; "Good question!" alone is not)."""
        return _matches(self.informed, agent_text)

    def reply(self) -> str:
        """How a good agent answers it, before its next move."""
        return f"Good question! {self.answer}"


@dataclass
class UserHabits:
    """How talkative and how sure a simulated user is (drawn per user; documented defaults)."""

    #: Chance to volunteer one more preference in a reply (the opening reply included).
    volunteer: float = 0.25
    #: Chance that the user is unsure about one preference at first: a vague answer (asked again, they answer).
    vague: float = 0.3
    #: Chance, per flexible preference, that the user has no preference on it ("you pick").
    flexible: float = 0.06
    #: Chance the user asks one side question during the episode.
    side_question: float = 0.25


@dataclass
class TaskWorld:
    """Everything a simulated conversation of one task needs; see the module docstring."""

    spec: TaskSpec
    attributes: tuple[WorldAttribute, ...]
    side_questions: tuple[SideQuestion, ...]
    act_templates: tuple[str, ...]
    user_openings: tuple[str, ...]
    act_markers: re.Pattern[str]
    habits: UserHabits = field(default_factory=UserHabits)
    _heldout_combinations: frozenset[tuple[str, ...]] | None = None

    # --- what the world is made of ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The task's name."""
        return self.spec.name

    @property
    def preferences(self) -> tuple[WorldAttribute, ...]:
        """The dimensions the agent must find out, in hint order (the first one names the thing recommended)."""
        return tuple(a for a in self.attributes if a.role == "preference")

    @property
    def traits(self) -> tuple[WorldAttribute, ...]:
        """The dimensions that shape only how the user talks."""
        return tuple(a for a in self.attributes if a.role == "trait")

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """Names of the preferences: what an agent has to learn before it acts."""
        return tuple(a.name for a in self.preferences)

    def attribute(self, name: str) -> WorldAttribute:
        """The dimension called ``name``."""
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(f"{self.name}: no dimension {name!r}")

    @property
    def persona_space(self) -> int:
        """How many combinations of preference values exist (traits and "you pick" not counted)."""
        return math.prod(len(a.values) for a in self.preferences)

    # --- personas and splits ----------------------------------------------------------------------------------

    def combination(self, persona: Mapping[str, Any]) -> tuple[str, ...]:
        """The persona's preference values, in dimension order."""
        return tuple(str(persona.get(a.name, ANY)) for a in self.preferences)

    def heldout_combinations(self) -> frozenset[tuple[str, ...]] | None:
        """The held-out value combinations when the space is small enough to list (else ``None``: by hash)."""
        if self._heldout_combinations is None and self.persona_space <= _ENUMERABLE:
            every = list(itertools.product(*(a.value_names for a in self.preferences)))
            ranked = sorted(every, key=lambda combo: combination_hash(self.name, combo))
            count = max(1 if len(every) >= 2 else 0, round(HELD_OUT_COMBINATIONS * len(every)))
            self._heldout_combinations = frozenset(ranked[:count])
        return self._heldout_combinations

    def combination_split(self, persona: Mapping[str, Any]) -> Split:
        """``"heldout"`` when the persona's combination is never trained on, else ``"train"``.

        A "you pick" value stands for every value of its dimension: the persona is held out when any combination
        it stands for is (so training never sees a held-out combination, not even through a flexible user).
        """
        options = [
            a.value_names if value == ANY else (value,)
            for a, value in zip(self.preferences, self.combination(persona), strict=True)
        ]
        listed = self.heldout_combinations()
        for combo in itertools.islice(itertools.product(*options), 4096):
            held = combo in listed if listed is not None else combination_hash(self.name, combo) < HELD_OUT_COMBINATIONS
            if held:
                return "heldout"
        return "train"

    def sample_persona(self, rng: random.Random, split: Split = "all") -> dict[str, str]:
        """A persona drawn uniformly from ``split``'s combinations (a flexible preference is "you pick" at times)."""
        for _ in range(1000):
            persona = {}
            for attribute in self.attributes:
                flexible = attribute.role == "preference" and attribute.flexible
                persona[attribute.name] = (
                    ANY if flexible and rng.random() < self.habits.flexible else rng.choice(attribute.value_names)
                )
            if split == "all" or self.combination_split(persona) == split:
                return persona
        raise ValueError(f"{self.name}: no persona in split {split!r} (persona space {self.persona_space})")

    def sample_personas(self, n: int, seed: int, split: Split = "all") -> list[dict[str, str]]:
        """``n`` personas from ``split``, reproducible from ``seed``."""
        return [self.sample_persona(stable_rng("persona", self.name, seed, index), split) for index in range(n)]

    def validate_persona(self, persona: Mapping[str, Any]) -> dict[str, str]:
        """The persona restricted to this world's dimensions; ``ValueError`` names a missing or unknown value."""
        checked: dict[str, str] = {}
        for attribute in self.attributes:
            value = persona.get(attribute.name)
            allowed = attribute.value_names + ((ANY,) if attribute.role == "preference" and attribute.flexible else ())
            if value not in allowed:
                raise ValueError(f"{self.name} persona: {attribute.name}={value!r} is not one of {', '.join(allowed)}")
            checked[attribute.name] = str(value)
        return checked

    def persona_type(self, persona: Mapping[str, Any]) -> str:
        """The label reports group personas by: the first preference's value."""
        return str(persona.get(self.preferences[0].name, "unknown")) if self.preferences else "all"

    def describe_persona(self, persona: Mapping[str, Any]) -> str:
        """The persona in plain words, for an LLM user's hidden prompt."""
        return "; ".join(
            f"{a.name}: {'no preference' if persona.get(a.name) == ANY else persona[a.name]}"
            for a in self.attributes
            if a.name in persona
        )

    # --- understanding what was said --------------------------------------------------------------------------

    def asked_attributes(self, agent_text: str) -> list[str]:
        """Which preferences an agent utterance asks about: those named in a sentence that is a question."""
        questions = [
            s for s in _SENTENCE.split(agent_text.strip()) if s.rstrip().endswith("?") or "tell me" in s.lower()
        ]
        if not questions:
            return []
        return [a.name for a in self.preferences if any(a.question_pattern.search(q) for q in questions)]

    def read_answers(self, user_text: str, phrasings: Split = "all") -> dict[str, str]:
        """Preference values a user's reply reveals (a value where exactly one of its dimension's matches; ``ANY``
        for "you pick"). ``phrasings`` limits the whole replies it knows by heart to one split: the agent's notes
        read with the training phrasings only, so a held-out phrasing is understood from its words or not at all."""
        lowered = user_text.lower()
        found: dict[str, str] = {}
        for attribute in self.preferences:
            if attribute.flexible_pattern.search(lowered):
                found[attribute.name] = ANY
                continue
            matching = [
                v.value
                for v in attribute.values
                if any(say.lower() in lowered for say in split_items(v.says, phrasings)) or _matches(v.words, lowered)
            ]
            if len(matching) > 1:  # a longer phrase that contains a shorter value's word wins ("not tight" aside)
                exact = [
                    v.value
                    for v in attribute.values
                    if v.value in matching and any(s.lower() in lowered for s in split_items(v.says, phrasings))
                ]
                matching = exact if len(exact) == 1 else matching
            if len(matching) == 1:
                found[attribute.name] = matching[0]
        return found

    def known_from_history(self, history: Sequence[MessageLike], phrasings: Split = "all") -> dict[str, str]:
        """Everything the user has revealed in a history (what a perfect listener knows; ``phrasings`` as in
        :meth:`read_answers`). A "you pick" that names no dimension answers the dimensions the agent's question
        before it asked about."""
        known: dict[str, str] = {}
        asked: list[str] = []
        for message in history:
            if message.role == "user":
                found = self.read_answers(message.text, phrasings)
                if not found and _FLEXIBLE_WORDS.search(message.text):
                    found = {name: ANY for name in asked}
                known.update(found)
            else:
                asked = self.asked_attributes(message.text)
        return known

    def side_question_in(self, user_text: str) -> SideQuestion | None:
        """The side question a user's reply asks, if any."""
        lowered = user_text.lower()
        for side in self.side_questions:
            if side.question.lower() in lowered:
                return side
        return None

    def pending_side_question(self, history: Sequence[MessageLike]) -> SideQuestion | None:
        """The side question the user asked in ``history`` that no agent reply has answered since (the newest)."""
        pending: SideQuestion | None = None
        for message in history:
            if message.role == "user":
                pending = self.side_question_in(message.text) or pending
            elif pending is not None and pending.is_answered_by(message.text):
                pending = None
        return pending

    # --- the final act and its judge -------------------------------------------------------------------------

    def _mentions(self, text: str) -> dict[str, list[str]]:
        return {a.name: [v.value for v in a.values if _matches(v.fit_pattern, text)] for a in self.preferences}

    def final_act(self, agent_text: str) -> FinalAct | None:
        """The final act in an agent utterance, or ``None`` when it asks or does not commit.

        A reply that asks about a preference is a question. Otherwise it commits when it names something fitting
        a value of the first preference (the thing recommended) or uses an act marker ("I recommend …"); naming
        things of two values of the first preference is a hedge.
        """
        if not self.preferences or self.asked_attributes(agent_text):
            return None
        main = self._mentions(agent_text)[self.preferences[0].name]
        if not main and not self.act_markers.search(agent_text):
            return None
        return FinalAct(key=agent_text.lower(), hedged=len(main) > 1)

    def act_problems(self, persona: Mapping[str, Any], act: FinalAct) -> list[str]:
        """Why a final act does not fit the persona (empty: it fits)."""
        if act.hedged:
            return ["hedged between several options"]
        text = str(act.key)
        mentions = self._mentions(text)
        problems: list[str] = []
        for attribute in self.preferences:
            wanted = str(persona.get(attribute.name, ANY))
            named = mentions[attribute.name]
            if wanted == ANY:
                if len(named) > 1:
                    problems.append(f"{attribute.name}: several values ({', '.join(named)})")
                continue
            others = [value for value in named if value != wanted]
            if others:
                problems.append(f"{attribute.name}: {', '.join(others)} instead of {wanted}")
            elif wanted not in named and attribute.value(wanted).fits:
                problems.append(f"{attribute.name}: nothing for {wanted}")
        for attribute in self.attributes:
            wanted = persona.get(attribute.name)
            if wanted in attribute.value_names and _matches(attribute.value(str(wanted)).clash_pattern, text):
                problems.append(f"{attribute.name}: clashes with {wanted}")
        return problems

    def act_fits(self, persona: Mapping[str, Any], act: FinalAct) -> bool:
        """Whether a final act fits the persona (the objective reward)."""
        return not self.act_problems(persona, act)

    def compose_act(self, known: Mapping[str, str], rng: random.Random) -> str:
        """A scripted agent's final act from what it knows, guessing unknown (and "you pick") values uniformly."""
        chosen = {
            a.name: known[a.name] if known.get(a.name, ANY) != ANY else rng.choice(a.value_names)
            for a in self.preferences
        }
        fits = {name: rng.choice(options) for name, options in self.fitting_options(chosen).items()}
        return self.fill_act_template(rng.choice(self.act_templates), fits)

    def fitting_options(self, values: Mapping[str, str]) -> dict[str, list[str]]:
        """For each preference with a value in ``values`` (``ANY`` and unknown ones left out), the phrases of the
        task file that honour it and clash with none of the others (all of them where every one clashes)."""
        chosen = {a.name: values[a.name] for a in self.preferences if values.get(a.name, ANY) != ANY}
        clash_patterns = [
            pattern for name, value in chosen.items() if (pattern := self.attribute(name).value(value).clash_pattern)
        ]
        options: dict[str, list[str]] = {}
        for name, value in chosen.items():
            every = list(self.attribute(name).value(value).fits)
            safe = [o for o in every if not any(p.search(o) for p in clash_patterns)]
            if safe or every:
                options[name] = safe or every
        return options

    def fill_act_template(self, template: str, fits: Mapping[str, str]) -> str:
        """A template with ``{main}``, ``{rest}`` and ``{<dimension>}`` filled from one fit per preference."""
        names = [a.name for a in self.preferences]
        main = fits.get(names[0], "") if names else ""
        rest_parts = [fits[name] for name in names[1:] if fits.get(name)]
        rest = (
            rest_parts[0]
            if len(rest_parts) == 1
            else ", ".join(rest_parts[:-1]) + " and " + rest_parts[-1]
            if rest_parts
            else ""
        )
        text = template.replace("{main}", main).replace("{rest}", rest)
        for name in names:
            text = text.replace("{" + name + "}", fits.get(name, ""))
        # a template written for every dimension reads well even when one asks for nothing
        text = re.sub(r"\s+([,.!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text)).replace(":.", ".").replace(",.", ".")
        return text.strip()

    def best_act(self, persona: Mapping[str, Any], rng: random.Random) -> str:
        """The final act of an agent that knows everything (the optimum)."""
        return self.compose_act({a.name: str(persona[a.name]) for a in self.preferences}, rng)

    def ask(self, attribute: str, rng: random.Random) -> str:
        """A question about one preference, sometimes after a short acknowledgement."""
        return rng.choice(phrases.ACKNOWLEDGEMENTS) + rng.choice(self.attribute(attribute).questions)

    def open_question(self, known: Mapping[str, str], rng: random.Random) -> str | None:
        """A question about the first preference not in ``known`` (``None`` when every one is known)."""
        unknown = [name for name in self.attribute_names if name not in known]
        return rng.choice(self.attribute(unknown[0]).questions) if unknown else None

    def next_move(self, known: Mapping[str, str], rng: random.Random) -> str:
        """What an agent that knows ``known`` does next: ask about a preference still open, else the final act."""
        return self.open_question(known, rng) or self.compose_act(known, rng)

    def clarifying_reply(self, history: Sequence[MessageLike], rng: random.Random | None = None) -> str:
        """A safe reply that moves the conversation on: a question about the first preference not yet known."""
        rng = rng or random.Random(len(history))
        known = self.known_from_history(history, phrasings="train")  # an agent knows only the training phrasings
        question = self.open_question(known, rng) or "Could you tell me a bit more?"
        return f"Sorry, I didn't quite get that. {question}"

    # --- users ------------------------------------------------------------------------------------------------

    def make_user(
        self, persona: Mapping[str, Any], *, seed: object = 0, max_turns: int | None = None, phrasings: Split = "all"
    ) -> WorldUser:
        """A simulated user playing ``persona``; ``phrasings`` picks the wording it speaks (training or held out)."""
        from imagine.world.user import WorldUser

        return WorldUser(
            self,
            self.validate_persona(persona),
            stable_rng("user", self.name, seed),
            max_turns or self.spec.max_turns,
            phrasings,
        )

    def says(self, attribute: str, value: str, split: Split) -> tuple[str, ...]:
        """How a user gives ``value`` of ``attribute`` in ``split``'s phrasings."""
        return split_items(self.attribute(attribute).value(value).says, split)
