"""The scripted travel user: hidden interest, budget and companions; one activity in 16 fits each persona.

Every combination (interest × budget × companions) has exactly one fitting activity in :data:`CATALOGUE`,
so an agent that asks about all three attributes can always succeed, and one that guesses succeeds by chance.
Names are short and distinctive ("the street food tour") so a small model can learn the mapping.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagine.simulated.base import Attribute, FinalAct, ScriptedTask, keyword_pattern


@dataclass(frozen=True, slots=True)
class Activity:
    """A catalogue entry: its name and the attribute values it fits."""

    name: str
    interest: str
    budget: str
    companions: str
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """The (interest, budget, companions) combination this activity fits."""
        return (self.interest, self.budget, self.companions)

    @property
    def phrases(self) -> tuple[str, ...]:
        """Lower-case phrases that name this activity in an agent's utterance."""
        return (self.name.removeprefix("the ").lower(), *self.aliases)


CATALOGUE: tuple[Activity, ...] = (
    Activity("the street food tour", "food", "tight", "adults"),
    Activity("the market picnic", "food", "tight", "kids"),
    Activity("the wine tasting dinner", "food", "generous", "adults", ("wine tasting",)),
    Activity("the family cooking class", "food", "generous", "kids", ("cooking class",)),
    Activity("the free walking tour", "history", "tight", "adults", ("walking tour",)),
    Activity("the castle treasure hunt", "history", "tight", "kids", ("treasure hunt",)),
    Activity("the private palace tour", "history", "generous", "adults", ("palace tour",)),
    Activity("the knights show", "history", "generous", "kids", ("knight show", "knights' show")),
    Activity("the mountain hike", "nature", "tight", "adults"),
    Activity("the duck pond walk", "nature", "tight", "kids"),
    Activity("the sailing trip", "nature", "generous", "adults", ("sailing",)),
    Activity("the safari park", "nature", "generous", "kids", ("safari",)),
    Activity("the street art walk", "art", "tight", "adults", ("street art",)),
    Activity("the painting workshop", "art", "tight", "kids"),
    Activity("the gallery night", "art", "generous", "adults"),
    Activity("the puppet theatre", "art", "generous", "kids", ("puppet theater", "puppet show")),
)

BY_KEY: dict[tuple[str, str, str], Activity] = {activity.key: activity for activity in CATALOGUE}

_ACTIVITY_PATTERNS: tuple[tuple[Activity, re.Pattern[str]], ...] = tuple(
    # A trailing plural ("the street food tours") still names the activity.
    (activity, re.compile(r"\b(?:" + "|".join(re.escape(p) for p in activity.phrases) + r")s?\b"))
    for activity in CATALOGUE
)

RECOMMENDATIONS: tuple[str, ...] = (
    "I recommend {activity}.",
    "You should try {activity}.",
    "How about {activity}?",
    "I'd suggest {activity}.",
    "{Activity} would be perfect for you.",
)

ACKNOWLEDGEMENTS: tuple[str, ...] = ("", "", "Great! ", "Got it. ", "Thanks. ", "Nice. ")

INTEREST = Attribute(
    name="interest",
    values=("food", "history", "nature", "art"),
    question_pattern=keyword_pattern(
        r"enjoy",
        r"into\b",
        r"interest",
        r"hobb",
        r"passion",
        r"fun\b",
        r"(?:like|love) (?:to do|doing)",
        r"what do you like",
        r"(?:kinds?|types?|sorts?) of (?:activit|thing|experience)",
    ),
    questions=(
        "What do you enjoy doing on a trip?",
        "What are you into?",
        "What kind of activities do you like?",
        "What do you like to do for fun?",
        "What are your interests?",
    ),
    answers={
        "food": ("I love trying local food.", "Food is my thing, honestly.", "I'm a big foodie.", "Mostly eating."),
        "history": ("I'm into history.", "Old castles fascinate me.", "I love learning about the past."),
        "nature": ("I love being outdoors in nature.", "Nature and fresh air, please.", "Parks, lakes and wildlife."),
        "art": ("I'm really into art.", "Galleries and painting, mostly.", "Anything creative and artistic."),
    },
    value_keywords={
        "food": keyword_pattern(r"food", r"eat", r"cuisine", r"dish", r"restaurant", r"culinar", r"tasting"),
        "history": keyword_pattern(r"histor", r"castle", r"ancient", r"heritage", r"ruins", r"the past"),
        "nature": keyword_pattern(r"nature", r"outdoor", r"hik", r"wildlife", r"park", r"lake", r"mountain"),
        "art": keyword_pattern(r"art\b", r"arts\b", r"galler", r"paint", r"creative", r"artist"),
    },
)

BUDGET = Attribute(
    name="budget",
    values=("tight", "generous"),
    question_pattern=keyword_pattern(
        r"budget", r"spend", r"money", r"cost", r"price", r"pric(?:y|ey)", r"afford", r"expensive", r"cheap", r"splurge"
    ),
    questions=(
        "What's your budget?",
        "How much do you want to spend?",
        "Are you looking for something cheap, or happy to splurge?",
        "How much can you afford?",
        "Is money a concern?",
    ),
    answers={
        "tight": ("I'm on a tight budget.", "Something cheap, please.", "I can't spend much.", "Money is tight."),
        "generous": (
            "Money is no problem.",
            "I'm happy to splurge.",
            "My budget is generous.",
            "Price doesn't matter.",
        ),
    },
    value_keywords={
        "tight": keyword_pattern(
            r"tight", r"cheap", r"low budget", r"small budget", r"limited", r"can't spend", r"frugal"
        ),
        "generous": keyword_pattern(
            r"generous", r"splurge", r"no problem", r"luxur", r"don't mind spending", r"big budget"
        ),
    },
)

COMPANIONS = Attribute(
    name="companions",
    values=("adults", "kids"),
    question_pattern=keyword_pattern(
        r"who\b",
        r"who's",
        r"with you\b",
        r"travel(?:l)?ing with",
        r"coming (?:with|along)",
        r"come with",
        r"alone",
        r"kids",
        r"child",
        r"family",
        r"companion",
        r"partner",
        r"friends",
        r"by yourself",
        r"on your own",
    ),
    questions=(
        "Who are you travelling with?",
        "Is anyone coming with you?",
        "Are you travelling alone or with others?",
        "Who's coming along?",
        "Are you bringing kids?",
    ),
    answers={
        "adults": ("Just me, travelling alone.", "My partner and I.", "A few friends and me.", "Just us adults."),
        "kids": ("I'm bringing my kids.", "It's a family trip with young children.", "My two children are coming."),
    },
    value_keywords={
        "adults": keyword_pattern(
            r"adults?\b", r"alone", r"by myself", r"partner", r"wife", r"husband", r"friends", r"solo"
        ),
        "kids": keyword_pattern(r"kids?\b", r"child", r"son\b", r"daughter", r"family", r"toddler"),
    },
)


class TravelTask(ScriptedTask):
    """Travel preference elicitation with an objective reward: the one recommended activity must fit."""

    name = "travel"
    attributes = (INTEREST, BUDGET, COMPANIONS)
    intro_replies = (
        "A short city break. I'd love one good activity idea.",
        "Just a few days away. What would you suggest?",
        "A weekend trip. Can you help me pick something to do?",
    )
    confused_replies = (
        "Sorry, I'm not sure what you mean.",
        "Hmm, can you ask that differently?",
        "I don't follow. What do you need to know?",
    )
    success_replies = ("That sounds perfect, I'll book it!", "Great idea, I love it!", "Yes! That's exactly my thing.")
    failure_replies = (
        "Hmm, that's not really for me.",
        "No thanks, that doesn't suit me.",
        "I don't think that fits what I want.",
    )
    hedge_replies = ("That's too many options. I wanted one clear suggestion.", "Please just pick one for me.")
    timeout_replies = ("I have to go now. Thanks anyway.", "I'll look elsewhere, bye.")

    def persona_type(self, persona: Mapping[str, Any]) -> str:
        """Reports group travellers by their main interest."""
        return str(persona.get("interest", "unknown"))

    def final_act(self, agent_text: str) -> FinalAct | None:
        """A recommendation: any catalogue activity named in the utterance; several named is a hedge."""
        lowered = agent_text.lower()
        named = [activity for activity, pattern in _ACTIVITY_PATTERNS if pattern.search(lowered)]
        if not named:
            return None
        if len(named) > 1:
            return FinalAct(key=None, hedged=True)
        return FinalAct(key=named[0].key)

    def act_fits(self, persona: Mapping[str, Any], act: FinalAct) -> bool:
        """The recommended activity fits interest, budget and companions."""
        return not act.hedged and act.key == (persona["interest"], persona["budget"], persona["companions"])

    def fitting_activity(self, persona: Mapping[str, Any]) -> Activity:
        """The one activity that fits a persona."""
        return BY_KEY[(persona["interest"], persona["budget"], persona["companions"])]

    def compose_act(self, known: Mapping[str, str], rng: random.Random) -> str:
        """Recommend the activity consistent with ``known``, guessing unknown attributes uniformly."""
        values = [known[a.name] if a.name in known else rng.choice(a.values) for a in self.attributes]
        activity = BY_KEY[(values[0], values[1], values[2])]
        template = rng.choice(RECOMMENDATIONS)
        text = template.format(activity=activity.name, Activity=activity.name[0].upper() + activity.name[1:])
        return text

    def ask(self, attribute: str, rng: random.Random) -> str:
        """A paraphrased question, sometimes after a short acknowledgement."""
        return rng.choice(ACKNOWLEDGEMENTS) + super().ask(attribute, rng)
