"""The scripted student: hidden level, preferred style and misconception about BC vs RL.

The tutor must give the explanation variant that matches the student's level and style (six variants, each
recognised by its signature phrase) and correct exactly the student's misconception, if any. The task's
opening line already asks about the level, so style and misconception are what a good tutor must still ask.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from imagine.simulated.base import Attribute, FinalAct, ScriptedTask, keyword_pattern

#: (level, style) → (signature phrase the student recognises, the explanation a scripted tutor gives).
EXPLANATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("beginner", "examples"): (
        "copying a chef",
        "Think of copying a chef: that is behaviour cloning. Cooking by trial and error and tasting is RL.",
    ),
    ("beginner", "formal"): (
        "in plain words",
        "In plain words: behaviour cloning copies an expert's actions, and RL learns from rewards for its own tries.",
    ),
    ("intermediate", "examples"): (
        "self-driving car",
        "Take a self-driving car: BC fits a model to recorded human driving, RL improves it from a reward.",
    ),
    ("intermediate", "formal"): (
        "state-action pairs",
        "Behaviour cloning is supervised learning on expert state-action pairs; RL optimises a policy from rewards.",
    ),
    ("expert", "examples"): (
        "compounding errors",
        "In robot grasping, a cloned policy suffers compounding errors off the demonstrations; RL can recover.",
    ),
    ("expert", "formal"): (
        "expected discounted return",
        "BC minimises log-loss to the expert's actions; RL maximises expected discounted return under shift.",
    ),
}

#: misconception → (signature pattern of its correction, the correction a scripted tutor adds).
CORRECTIONS: dict[str, tuple[re.Pattern[str], str]] = {
    "no_data": (keyword_pattern(r"does need data", r"needs data too", r"also needs data"), "And RL does need data."),
    "bc_is_rl": (
        keyword_pattern(r"(?:bc|behaviou?r cloning) is not (?:rl|reinforcement)", r"uses no rewards"),
        "Also, behaviour cloning is not RL: it uses no rewards.",
    ),
}

_EXPLANATION_PATTERNS: tuple[tuple[tuple[str, str], re.Pattern[str]], ...] = tuple(
    (key, re.compile(r"\b" + re.escape(phrase) + r"\b")) for key, (phrase, _) in EXPLANATIONS.items()
)

LEVEL = Attribute(
    name="level",
    values=("beginner", "intermediate", "expert"),
    question_pattern=keyword_pattern(
        r"know about",
        r"background",
        r"familiar",
        r"experience",
        r"studied",
        r"level\b",
        r"new to",
        r"have you (?:used|learn|worked|done)",
    ),
    questions=(
        "How much do you know about machine learning?",
        "What's your background?",
        "How familiar are you with machine learning?",
        "Have you studied machine learning before?",
    ),
    answers={
        "beginner": ("I've never done any machine learning.", "I'm completely new to this.", "No background, sorry."),
        "intermediate": ("I've taken one ML course.", "I know some supervised learning.", "I've trained a few models."),
        "expert": ("I do ML research.", "I'm an ML engineer.", "I know the field well."),
    },
    value_keywords={
        "beginner": keyword_pattern(r"never", r"new to", r"no background", r"beginner", r"nothing"),
        "intermediate": keyword_pattern(r"a course", r"one course", r"some", r"a bit", r"a little", r"basics"),
        "expert": keyword_pattern(r"research", r"engineer", r"expert", r"phd", r"professional", r"for years"),
    },
)

STYLE = Attribute(
    name="style",
    values=("examples", "formal"),
    question_pattern=keyword_pattern(
        r"examples?\b",
        r"formal",
        r"prefer",
        r"learn best",
        r"style",
        r"analog",
        r"intuiti",
        r"precise",
        r"definitions?\b",
        r"explain (?:it|things)",
    ),
    questions=(
        "Do you prefer examples or formal definitions?",
        "How do you learn best?",
        "Should I use an everyday analogy or be precise?",
        "What style of explanation do you like?",
    ),
    answers={
        "examples": ("Concrete examples help me most.", "I like everyday analogies.", "Stories work best for me."),
        "formal": ("I prefer precise definitions.", "Give me the formal version.", "I like exact terms."),
    },
    value_keywords={
        "examples": keyword_pattern(r"examples?", r"analog", r"stories", r"story", r"concrete", r"intuiti"),
        "formal": keyword_pattern(r"formal", r"precise", r"definitions?", r"math", r"equations?", r"rigor"),
    },
)

MISCONCEPTION = Attribute(
    name="misconception",
    values=("none", "no_data", "bc_is_rl"),
    question_pattern=keyword_pattern(
        r"what do you think",
        r"have you heard",
        r"your (?:current )?understanding",
        r"guess",
        r"how (?:do )?(?:you think )?they differ",
        r"believe",
        r"misconception",
        r"already know about (?:rl|them|the two)",
    ),
    questions=(
        "What do you think the difference is?",
        "What have you heard about them so far?",
        "What's your current understanding of the two?",
        "Any guess how they differ?",
    ),
    answers={
        "none": ("No idea yet, honestly.", "I haven't heard much about either.", "I'm not sure how they differ."),
        "no_data": ("I thought RL needs no data.", "Isn't RL the one without any data?", "I heard RL uses no data."),
        "bc_is_rl": ("I thought cloning is a kind of RL.", "Aren't they the same thing?", "Isn't BC just RL?"),
    },
    value_keywords={
        "none": keyword_pattern(r"no idea", r"not sure", r"haven't heard", r"don't know"),
        "no_data": keyword_pattern(r"no data", r"without (?:any )?data", r"doesn't need data", r"needs no data"),
        "bc_is_rl": keyword_pattern(r"same thing", r"kind of (?:rl|reinforcement)", r"(?:bc|cloning) is (?:just )?rl"),
    },
)

ACKNOWLEDGEMENTS: tuple[str, ...] = ("", "", "Thanks! ", "Good to know. ", "Okay. ")


class TeachingTask(ScriptedTask):
    """Explaining BC vs RL with an objective reward: the explanation must match level, style and misconception."""

    name = "teaching"
    attributes = (LEVEL, STYLE, MISCONCEPTION)
    intro_replies = ("I just want to understand the difference.", "Can you just explain it to me?")
    confused_replies = ("Sorry, I don't understand the question.", "Hmm, what do you mean?", "I'm not sure.")
    success_replies = ("That makes sense now, thank you!", "Oh, I get it now. Thanks!", "Perfect, that's clear.")
    failure_replies = (
        "Hmm, I'm still confused.",
        "That doesn't really help me.",
        "I don't think that answers my question.",
    )
    hedge_replies = ("That's a lot at once. I'm more confused now.",)
    timeout_replies = ("I have to go now. Maybe another time.",)

    def persona_type(self, persona: Mapping[str, Any]) -> str:
        """Reports group students by knowledge level."""
        return str(persona.get("level", "unknown"))

    def final_act(self, agent_text: str) -> FinalAct | None:
        """An explanation: a variant's signature phrase, plus any misconception corrections."""
        lowered = agent_text.lower()
        variants = [key for key, pattern in _EXPLANATION_PATTERNS if pattern.search(lowered)]
        if not variants:
            return None
        if len(variants) > 1:
            return FinalAct(key=None, hedged=True)
        corrected = frozenset(name for name, (pattern, _) in CORRECTIONS.items() if pattern.search(lowered))
        return FinalAct(key=(variants[0][0], variants[0][1], corrected))

    def act_fits(self, persona: Mapping[str, Any], act: FinalAct) -> bool:
        """Right level and style, and exactly the student's misconception corrected (none if they have none)."""
        if act.hedged:
            return False
        level, style, corrected = act.key
        needed = frozenset() if persona["misconception"] == "none" else frozenset({persona["misconception"]})
        return (level, style) == (persona["level"], persona["style"]) and corrected == needed

    def compose_act(self, known: Mapping[str, str], rng: random.Random) -> str:
        """The explanation for what is known, guessing the rest; adds the (possibly guessed) correction."""
        level = known.get("level") or rng.choice(LEVEL.values)
        style = known.get("style") or rng.choice(STYLE.values)
        misconception = known.get("misconception") or rng.choice(MISCONCEPTION.values)
        text = EXPLANATIONS[(level, style)][1]
        if misconception != "none":
            text += " " + CORRECTIONS[misconception][1]
        return text

    def ask(self, attribute: str, rng: random.Random) -> str:
        """A paraphrased question, sometimes after a short acknowledgement."""
        return rng.choice(ACKNOWLEDGEMENTS) + super().ask(attribute, rng)
