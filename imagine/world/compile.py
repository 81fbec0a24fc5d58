"""Compile a task spec into its :class:`TaskWorld`, and check every line it will say before it is used.

What the task file details (``[[task.attributes]]``, ``side_questions``, ``act_templates``, ``user_openings``) is
taken as written; everything else comes from the dimension and value names through the generic lines of
:mod:`imagine.world.phrases`. The compiled world is then checked: every question must be recognised as asking
about its own dimension (and nothing else), and the act an all-knowing agent composes for sampled personas must be
recognised as an act and judged a fit. A failed check raises :class:`TaskWorldError` naming the lines to fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from imagine.conversation import stable_rng
from imagine.task import AttributeSpec, TaskSpec, ValueSpec, load_task
from imagine.world import phrases
from imagine.world.world import SideQuestion, TaskWorld, WorldAttribute, WorldValue, phrase_pattern

#: Personas whose best act the compile check judges.
_CHECKED_PERSONAS = 300

_cache: dict[str, TaskWorld] = {}


class TaskWorldError(ValueError):
    """A task cannot be compiled into a world (a dimension without values, a line the world misreads)."""


def world_for(task: TaskSpec | str | Path) -> TaskWorld:
    """The compiled world of a task (a spec, a built-in name or a TOML path); compiled once per spec."""
    spec = task if isinstance(task, TaskSpec) else load_task(task)
    key = spec.model_dump_json()
    world = _cache.get(key)
    if world is None:
        world = _cache[key] = compile_world(spec)
    return world


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z'-]+", text.lower()) if w not in phrases.STOPWORDS and len(w) >= 3]


def _compile_value(dimension: str, value: str, detail: ValueSpec | None) -> WorldValue:
    says = (
        tuple(detail.says)
        if detail and detail.says
        else tuple(
            template.format(value=value, Value=value[0].upper() + value[1:], dimension=dimension)
            for template in phrases.ANSWER_TEMPLATES
        )
    )
    words = [*(detail.words if detail else ()), value]
    # fits written out (perhaps empty on purpose: the value asks for nothing), else the value's own name
    fits = tuple(detail.fits) if detail is not None and "fits" in detail.model_fields_set else (value,)
    return WorldValue(
        value=value,
        says=says,
        words=phrase_pattern(words, prefix=True),
        fits=fits,
        fit_pattern=phrase_pattern(fits),
        clash_pattern=phrase_pattern(detail.clashes if detail else ()),
        volunteer=detail.volunteer if detail else None,
    )


def _compile_attribute(dimension: str, values: tuple[str, ...], detail: AttributeSpec | None) -> WorldAttribute:
    if not values:
        raise TaskWorldError(
            f"persona hint {dimension!r} lists no values: write it as 'dimension (value, value, ...)' so users can "
            "be simulated and acts judged"
        )
    by_value = {v.value: v for v in detail.values} if detail else {}
    listing = ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]
    questions = (
        tuple(detail.questions)
        if detail and detail.questions
        else tuple(t.format(dimension=dimension, values=listing) for t in phrases.QUESTION_TEMPLATES)
    )
    question_words = list(detail.question_words) if detail and detail.question_words else _words(dimension)
    if not question_words:
        question_words = [dimension]
    # question words match at word starts, so "spend" also catches "spending"
    pattern = re.compile("|".join(r"\b" + re.escape(w.lower()) for w in question_words), re.IGNORECASE)
    return WorldAttribute(
        name=dimension,
        role=detail.role if detail else "preference",
        values=tuple(_compile_value(dimension, value, by_value.get(value)) for value in values),
        questions=questions,
        question_pattern=pattern,
        flexible=detail.flexible if detail else True,
        flexible_pattern=re.compile(r"\b(?:don't|do not) mind (?:the )?" + re.escape(dimension.lower()), re.IGNORECASE),
    )


def _side_question(question: str, answer: str, words: list[str]) -> SideQuestion:
    answered = phrase_pattern([*phrases.SIDE_ACKNOWLEDGEMENTS, *(words or [answer])])
    informed = phrase_pattern(words or [answer])
    assert answered is not None and informed is not None
    return SideQuestion(question=question, answer=answer, answered=answered, informed=informed)


def compile_world(spec: TaskSpec, *, check: bool = True) -> TaskWorld:
    """Build the world of ``spec`` and, unless told not to, check it (see the module docstring)."""
    from imagine.personas import dimensions

    details = {a.dimension: a for a in spec.attributes}
    attributes = tuple(_compile_attribute(d.name, d.values, details.get(d.name)) for d in dimensions(spec))
    if not any(a.role == "preference" for a in attributes):
        raise TaskWorldError(
            f"task {spec.name!r}: no persona dimension is a preference, so there is nothing to find out"
        )
    sides = (
        tuple(_side_question(s.question, s.answer, s.answer_words) for s in spec.side_questions)
        if spec.side_questions
        else tuple(_side_question(q, a, []) for q, a in phrases.SIDE_QUESTIONS)
    )
    markers = phrase_pattern(phrases.ACT_MARKERS)
    assert markers is not None
    world = TaskWorld(
        spec=spec,
        attributes=attributes,
        side_questions=sides,
        act_templates=tuple(spec.act_templates) or phrases.ACT_TEMPLATES,
        user_openings=tuple(spec.user_openings) or phrases.USER_OPENINGS,
        act_markers=markers,
    )
    if check:
        check_world(world)
    return world


def check_world(world: TaskWorld) -> None:
    """Raise :class:`TaskWorldError` when the world would misread its own lines (see the module docstring)."""
    problems: list[str] = []
    known_placeholders = {"main", "rest", *world.attribute_names}
    for template in world.act_templates:
        for placeholder in re.findall(r"\{([^{}]*)\}", template):
            if placeholder not in known_placeholders:
                problems.append(
                    f"act template {template!r}: {{{placeholder}}} is not main, rest or a preference "
                    f"({', '.join(world.attribute_names)})"
                )
    for attribute in world.preferences:
        for question in attribute.questions:
            asked = world.asked_attributes(question)
            if asked != [attribute.name]:
                problems.append(
                    f"question {question!r} for {attribute.name!r} reads as asking about {asked or 'nothing'}"
                )
        for value in attribute.values:
            for say in value.says:
                read = world.read_answers(say)
                if read.get(attribute.name) != value.value:
                    problems.append(
                        f"{attribute.name}={value.value!r}: the reply {say!r} reads as {read.get(attribute.name)!r}"
                    )
                if stray := {k: v for k, v in read.items() if k != attribute.name}:
                    problems.append(f"{attribute.name}={value.value!r}: the reply {say!r} also reads as {stray}")
    neutral = [
        *world.user_openings,
        *(side.question for side in world.side_questions),
        *(line.format(dimension=a.name) for a in world.preferences for line in phrases.VAGUE_REPLIES),
    ]
    for line in neutral:
        if read := world.read_answers(line):
            problems.append(f"the user line {line!r} should give nothing away but reads as {read}")
    for index, persona in enumerate(world.sample_personas(_CHECKED_PERSONAS, seed=0)):
        complete = {k: v for k, v in persona.items()}
        act = world.best_act(complete, stable_rng("check", world.name, index))
        found = world.final_act(act)
        if found is None:
            problems.append(f"the act {act!r} is not recognised as an act")
        elif not world.act_fits(complete, found):
            problems.append(
                f"the act {act!r} does not fit {complete}: {'; '.join(world.act_problems(complete, found))}"
            )
        if len(problems) >= 12:
            break
    if problems:
        raise TaskWorldError(f"task {world.name!r}: " + " | ".join(dict.fromkeys(problems)))
