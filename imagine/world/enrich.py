"""Enrich a task's world once with an LLM, into a file the author reviews: ``<task>.world.toml``.

With nothing but value names the world works, but its users speak in templates ("I'd say tight.") and its acts
name the values themselves. Where an OpenAI-compatible server is configured, :func:`enrich_world` asks it, per
persona dimension, how users say each value, which words identify it, what in a final act honours or clashes with
it, and how an agent asks. Every line it returns is checked before use: a question must read as asking about its
own dimension, a reply must read as its own value and nothing else, and the world must then compile (acts
recognised and judged fitting). Lines that fail are dropped (and counted); what is left is written as TOML that
``TaskSpec.from_toml`` merges under the task file's own details. The author edits it like any other file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imagine.parsing import DialogueParseError, extract_json
from imagine.simulated.llm_user import ChatCompleter
from imagine.task import AttributeSpec, TaskSpec, ValueSpec, world_file
from imagine.world.compile import TaskWorldError, compile_world

#: How many lines of each kind the LLM is asked for.
SAYS_PER_VALUE = 6
QUESTIONS_PER_DIMENSION = 5


@dataclass
class EnrichReport:
    """What an enrichment produced: the details kept, and what was dropped and why."""

    attributes: list[AttributeSpec] = field(default_factory=list)
    #: dimension → why its reply was unusable (the dimension keeps the defaults from its names).
    failed: dict[str, str] = field(default_factory=dict)
    #: Lines dropped by the checks, e.g. ``"budget='tight': reply 'Cheap, no kids.' also reads as …"``.
    dropped: list[str] = field(default_factory=list)


def _prompt(task: TaskSpec, dimension: str, values: tuple[str, ...]) -> str:
    listed = ", ".join(repr(v) for v in values)
    return (
        f"We simulate users of a chat assistant. The assistant is {task.agent_role}; its goal: {task.agent_goal}\n"
        f"Users are: {task.user_role}\nSuccess: {task.success}\n\n"
        f"One way users differ is '{dimension}', with the values {listed}.\n"
        "Answer with one JSON object only:\n"
        '{"role": "preference" if the assistant must find it out and its final suggestion must suit it, or "trait" '
        "if it only shapes how the user talks,\n"
        f' "questions": {QUESTIONS_PER_DIMENSION} short questions the assistant may ask about it,\n'
        ' "question_words": words that mark a question about it (not words of any value),\n'
        ' "values": [{"value": one of the values exactly as written,\n'
        f'   "says": {SAYS_PER_VALUE} short, varied replies in which a user gives this value (never another value),\n'
        '   "words": words or short phrases that identify this value in what a user writes,\n'
        '   "fits": 2-3 short phrases the assistant\'s final suggestion includes to suit this value (for the first '
        "dimension: the concrete thing suggested, e.g. 'a street food tour'),\n"
        '   "clashes": phrases that must not appear in a suggestion for this value}]}'
    )


def _attribute(dimension: str, values: tuple[str, ...], data: Any) -> AttributeSpec:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    details = []
    for item in data.get("values") or []:
        if isinstance(item, dict) and item.get("value") in values:
            details.append(
                ValueSpec.model_validate(
                    {
                        "value": item["value"],
                        **{
                            key: [str(x).strip() for x in item.get(key) or [] if str(x).strip()]
                            for key in ("says", "words", "fits", "clashes")
                        },
                    }
                )
            )
    return AttributeSpec(
        dimension=dimension,
        role="trait" if data.get("role") == "trait" else "preference",
        questions=[str(q).strip() for q in data.get("questions") or [] if str(q).strip()],
        question_words=[str(w).strip() for w in data.get("question_words") or [] if str(w).strip()],
        values=details,
    )


def _checked(spec: TaskSpec, attributes: list[AttributeSpec], report: EnrichReport) -> list[AttributeSpec]:
    """The attributes with every line that the world would misread dropped (see the module docstring)."""
    trial = spec.model_copy(update={"attributes": attributes})
    world = compile_world(trial, check=False)
    kept: list[AttributeSpec] = []
    for attribute in attributes:
        compiled = world.attribute(attribute.dimension)
        questions = []
        for question in attribute.questions:
            if attribute.role == "trait" or world.asked_attributes(question) == [attribute.dimension]:
                questions.append(question)
            else:
                report.dropped.append(f"{attribute.dimension}: question {question!r} reads as another dimension")
        values = []
        for value in attribute.values:
            says = []
            for say in value.says:
                read = world.read_answers(say)
                if compiled.role == "trait" or read == {attribute.dimension: value.value}:
                    says.append(say)
                else:
                    report.dropped.append(f"{attribute.dimension}={value.value!r}: reply {say!r} reads as {read}")
            values.append(value.model_copy(update={"says": says}))
        kept.append(attribute.model_copy(update={"questions": questions, "values": values}))
    try:
        compile_world(spec.model_copy(update={"attributes": kept}))
    except TaskWorldError as error:
        # the acts do not hold together: keep how users speak, and let acts name the values themselves
        report.dropped.append(f"fits and clashes, the world would not compile with them: {error}")
        kept = [a.model_copy(update={"values": [_without_acts(v) for v in a.values]}) for a in kept]
        compile_world(spec.model_copy(update={"attributes": kept}))
    return kept


def _without_acts(value: ValueSpec) -> ValueSpec:
    return ValueSpec.model_validate(value.model_dump(exclude={"fits", "clashes"}, exclude_unset=True))


async def enrich_world(task: TaskSpec, backend: ChatCompleter) -> EnrichReport:
    """Ask ``backend`` for every dimension's details and check them (see the module docstring)."""
    from imagine.personas import dimensions

    report = EnrichReport()
    attributes: list[AttributeSpec] = []
    for dimension in dimensions(task):
        if not dimension.values or any(a.dimension == dimension.name for a in task.attributes):
            continue  # nothing to enrich, or the task file details it already
        prompt = _prompt(task, dimension.name, dimension.values)
        try:
            reply = await backend.complete([{"role": "user", "content": prompt}], max_tokens=1200, temperature=0.7)
            attributes.append(_attribute(dimension.name, dimension.values, extract_json(reply)))
        except (DialogueParseError, ValidationError, ValueError) as error:
            report.failed[dimension.name] = f"{type(error).__name__}: {str(error)[:200]}"
    report.attributes = _checked(task, [*task.attributes, *attributes], report)[len(task.attributes) :]
    return report


def world_toml(attributes: list[AttributeSpec]) -> str:
    """The details as a ``<task>.world.toml`` file (``[[attributes]]`` tables)."""
    lines = [
        "# Details of this task's world, written by `reverie world enrich` and checked before use.",
        "# Edit freely: the task file's own [[task.attributes]] win over these; `reverie world check` re-checks.",
    ]

    def strings(items: list[str]) -> str:
        return "[" + ", ".join(json.dumps(item, ensure_ascii=False) for item in items) + "]"

    for attribute in attributes:
        lines += ["", "[[attributes]]", f"dimension = {json.dumps(attribute.dimension)}", f'role = "{attribute.role}"']
        if attribute.questions:
            lines.append(f"questions = {strings(attribute.questions)}")
        if attribute.question_words:
            lines.append(f"question_words = {strings(attribute.question_words)}")
        for value in attribute.values:
            lines += ["", "  [[attributes.values]]", f"  value = {json.dumps(value.value, ensure_ascii=False)}"]
            for key in ("says", "words", "fits", "clashes"):
                items = getattr(value, key)
                if items or key in value.model_fields_set:
                    lines.append(f"  {key} = {strings(items)}")
    return "\n".join(lines) + "\n"


def write_world_file(task_path: str | Path, attributes: list[AttributeSpec], *, force: bool = False) -> Path:
    """Write ``<task>.world.toml`` beside the task file; ``FileExistsError`` unless ``force``."""
    path = world_file(task_path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: edit it, or enrich again with --force to replace it")
    path.write_text(world_toml(attributes), encoding="utf-8")
    return path
