"""Task specifications: the plain-text task description the paper starts from, as TOML.

A :class:`TaskSpec` says what the agent wants, who the user is, what success means, how personas vary,
what a good imagined dialogue must satisfy, how the agent opens and how long a dialogue may run.
Built-in specs live in ``imagine/tasks/*.toml``; a user adds a task by writing one more TOML file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

BUILTIN_DIR = Path(__file__).parent / "tasks"


class TaskSpecError(ValueError):
    """A task file is missing, is not TOML, or does not describe a valid task (file and field named)."""


def _no_blank(items: list[str]) -> list[str]:
    if any(not item.strip() for item in items):
        raise ValueError("items must not be blank")
    return items


class ValueSpec(BaseModel):
    """How one value of a persona dimension shows in a dialogue (every field optional: the world compiler
    derives what is missing from the value's name, see ``imagine.world``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str = Field(min_length=1, description="The value, exactly as the persona hint lists it.")
    says: list[str] = Field(
        default_factory=list,
        description="Whole replies in which a user gives this value, e.g. 'We're on a shoestring.'",
    )
    words: list[str] = Field(
        default_factory=list,
        description="Words or phrases that identify the value in what a user writes (matched at word starts, "
        "case-insensitive), e.g. 'shoestring', 'cheap'.",
    )
    fits: list[str] = Field(
        default_factory=list,
        description="Phrases that honour the value in the agent's final act, e.g. 'budget-friendly'; the first "
        "preference dimension's fits name the thing recommended ('the street food tour'). Empty for a value that "
        "asks for nothing (a student with no misconception).",
    )
    clashes: list[str] = Field(
        default_factory=list, description="Phrases that must not appear in a final act for this value, e.g. 'bar'."
    )
    volunteer: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="For a trait value: the chance that such a user volunteers a preference unprompted in a reply.",
    )

    @field_validator("says", "words", "fits", "clashes")
    @classmethod
    def _no_blank_items(cls, items: list[str]) -> list[str]:
        return _no_blank(items)


class AttributeSpec(BaseModel):
    """Details of one persona dimension (a ``persona_hints`` entry), read by the world compiler."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dimension: str = Field(min_length=1, description="The hint's dimension, the text before its parentheses.")
    role: Literal["preference", "trait"] = Field(
        default="preference",
        description="'preference': the agent must find it out and the final act must honour it; 'trait': how the "
        "user talks (never asked, never judged).",
    )
    questions: list[str] = Field(default_factory=list, description="How an agent asks about it (whole questions).")
    question_words: list[str] = Field(
        default_factory=list,
        description="Words that mark a question about it ('budget', 'spend'); default: the dimension's own words.",
    )
    flexible: bool = Field(
        default=True, description="Whether some users say 'you pick' for it (any value then honours it)."
    )
    values: list[ValueSpec] = Field(default_factory=list, description="Details per value (any subset of them).")

    @field_validator("questions", "question_words")
    @classmethod
    def _no_blank_items(cls, items: list[str]) -> list[str]:
        return _no_blank(items)


class SideQuestionSpec(BaseModel):
    """A question a user may ask on the side, and the brief answer a good agent gives before steering back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1, description="What the user asks, e.g. 'Do I need to book ahead?'")
    answer: str = Field(min_length=1, description="A brief answer, e.g. 'Booking a day ahead is wise.'")
    answer_words: list[str] = Field(
        default_factory=list, description="Words that show an agent's reply answered it (default: from the answer)."
    )


class TaskSpec(BaseModel):
    """One goal-directed dialogue task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="Short identifier, stored with data.")
    title: str = Field(min_length=1, description="Human-readable name.")
    agent_role: str = Field(min_length=1, description="Who the agent is, e.g. 'a travel agent'.")
    agent_goal: str = Field(min_length=1, description="What the agent tries to achieve in the dialogue.")
    user_role: str = Field(min_length=1, description="Who the user is and what they know or want.")
    success: str = Field(min_length=1, description="When the dialogue counts as a success (reward 1).")
    failure: str = Field(min_length=1, description="What a failed dialogue looks like (reward 0).")
    persona_hints: list[str] = Field(min_length=1, description="Dimensions along which users differ.")
    critique_criteria: list[str] = Field(min_length=1, description="Checks an imagined dialogue must pass.")
    opening_line: str = Field(min_length=1, description="The agent's first utterance.")
    max_turns: int = Field(default=8, ge=2, le=64, description="Agent turns before the dialogue ends.")
    agent_style: str = Field(default="", description="Extra guidance for the agent's replies.")
    act_instruction: str = Field(
        default="",
        description="What the agent does once it knows enough, e.g. 'Recommend one activity.' "
        "(turn-by-turn imagination; default: pursue the goal).",
    )
    user_aliases: list[str] = Field(
        default_factory=list, description="Other names an LLM may give the user in a dialogue, e.g. 'Traveller'."
    )
    agent_aliases: list[str] = Field(
        default_factory=list, description="Other names an LLM may give the agent in a dialogue, e.g. 'Tutor'."
    )

    attributes: list[AttributeSpec] = Field(
        default_factory=list,
        description="Optional details per persona dimension (how users say each value, what fits or clashes with "
        "it in a final act); see imagine.world. Dimensions without details are compiled from their names.",
    )
    side_questions: list[SideQuestionSpec] = Field(
        default_factory=list, description="Questions simulated users may ask on the side (default: generic ones)."
    )
    act_templates: list[str] = Field(
        default_factory=list,
        description="How a scripted agent phrases its final act: '{main}' is the first preference's fit, '{rest}' "
        "the others' joined, '{<dimension>}' one dimension's fit (default: generic recommendation sentences).",
    )
    user_openings: list[str] = Field(
        default_factory=list,
        description="A simulated user's first reply to the opening line when it asks nothing (default: generic).",
    )

    #: Where the spec was read from (a file path), so child processes can load the very same file.
    _source: Path | None = PrivateAttr(default=None)

    @field_validator("persona_hints", "critique_criteria", "user_aliases", "agent_aliases", "act_templates")
    @classmethod
    def _no_blank_items(cls, items: list[str]) -> list[str]:
        return _no_blank(items)

    @model_validator(mode="after")
    def _attributes_match_hints(self) -> TaskSpec:
        hinted = hint_values(self.persona_hints)
        seen: set[str] = set()
        for index, attribute in enumerate(self.attributes):
            where = f"attributes.{index}"
            if attribute.dimension not in hinted:
                raise ValueError(
                    f"{where}.dimension: {attribute.dimension!r} is not a persona hint's dimension "
                    f"(have: {', '.join(hinted)})"
                )
            if attribute.dimension in seen:
                raise ValueError(f"{where}.dimension: {attribute.dimension!r} is detailed twice")
            seen.add(attribute.dimension)
            for value_index, value in enumerate(attribute.values):
                if value.value not in hinted[attribute.dimension]:
                    raise ValueError(
                        f"{where}.values.{value_index}.value: {value.value!r} is not listed in the hint for "
                        f"{attribute.dimension!r} ({', '.join(hinted[attribute.dimension]) or 'no values'})"
                    )
        return self

    @property
    def reference(self) -> str:
        """What ``load_task`` loads this spec back from: its file's path (child processes get this)."""
        return str(self._source) if self._source is not None else self.name

    @property
    def system_prompt(self) -> str:
        """The agent's system prompt: used by the prompted base model and in every training sequence."""
        style = f" {self.agent_style}" if self.agent_style else ""
        return (
            f"You are {self.agent_role}. {self.agent_goal} "
            f"Ask short questions to learn about the user before you act.{style} Keep each reply brief."
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> TaskSpec:
        """Load and validate a task file; errors name the file and the field."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise TaskSpecError(f"{path}: no such task file") from error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise TaskSpecError(f"{path}: not valid TOML: {error}") from error
        try:
            spec = cls.model_validate(_with_world_file(data.get("task", data), path))
        except ValidationError as error:
            problems = "; ".join(
                f"field '{'.'.join(str(p) for p in e['loc']) or '(top level)'}': {e['msg']}" for e in error.errors()
            )
            raise TaskSpecError(f"{path}: {problems}") from error
        spec._source = path.resolve()
        return spec


def world_file(task_path: str | Path) -> Path:
    """The reviewable file of compiled-world details beside a task file: ``gift.toml`` → ``gift.world.toml``."""
    path = Path(task_path)
    return path.with_name(f"{path.stem}.world.toml")


def _with_world_file(data: dict[str, object], path: Path) -> dict[str, object]:
    """Task data with the details of ``<task>.world.toml`` (written by ``reverie world enrich``, then edited by
    the author) filled in where the task file itself details nothing for a dimension."""
    extra = world_file(path)
    if not extra.is_file() or not isinstance(data, dict):
        return data
    try:
        details = tomllib.loads(extra.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TaskSpecError(f"{extra}: not valid TOML: {error}") from error
    own = {str(a.get("dimension")) for a in data.get("attributes", []) if isinstance(a, dict)}  # type: ignore[union-attr]
    merged = dict(data)
    merged["attributes"] = [
        *data.get("attributes", []),  # type: ignore[misc]
        *(a for a in details.get("attributes", []) if isinstance(a, dict) and str(a.get("dimension")) not in own),
    ]
    if not data.get("side_questions") and details.get("side_questions"):
        merged["side_questions"] = details["side_questions"]
    return merged


def hint_values(hints: list[str]) -> dict[str, tuple[str, ...]]:
    """dimension → its listed values, for every persona hint (``imagine.personas.dimensions`` reads the same)."""
    parsed: dict[str, tuple[str, ...]] = {}
    for hint in hints:
        match = re.match(r"^\s*(?P<name>[^(]+?)\s*\((?P<values>.*)\)\s*$", hint)
        if not match:
            parsed[hint.strip()] = ()
            continue
        raw = re.split(r",(?=(?:[^']*'[^']*')*[^']*$)|\s+or\s+", match.group("values"))
        parsed[match.group("name")] = tuple(v.strip().strip("'\"").strip() for v in raw if v.strip().strip("'\""))
    return parsed


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped with Reverie."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A built-in task by name (``travel``, ``teaching``) or a task TOML file by path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        return TaskSpec.from_toml(candidate)
    builtin = BUILTIN_DIR / f"{name_or_path}.toml"
    if not builtin.is_file():
        raise TaskSpecError(
            f"unknown task {str(name_or_path)!r}: built-in tasks are {', '.join(builtin_tasks())}, "
            "or give the path of a .toml file"
        )
    return TaskSpec.from_toml(builtin)
