"""Task specifications: the plain-text task description the paper starts from, as TOML.

A :class:`TaskSpec` says what the agent wants, who the user is, what success means, how personas vary,
what a good imagined dialogue must satisfy, how the agent opens and how long a dialogue may run.
Built-in specs live in ``imagine/tasks/*.toml``; a user adds a task by writing one more TOML file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

BUILTIN_DIR = Path(__file__).parent / "tasks"


class TaskSpecError(ValueError):
    """A task file is missing, is not TOML, or does not describe a valid task (file and field named)."""


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

    @field_validator("persona_hints", "critique_criteria", "user_aliases", "agent_aliases")
    @classmethod
    def _no_blank_items(cls, items: list[str]) -> list[str]:
        if any(not item.strip() for item in items):
            raise ValueError("items must not be blank")
        return items

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
            return cls.model_validate(data.get("task", data))
        except ValidationError as error:
            problems = "; ".join(
                f"field '{'.'.join(str(p) for p in e['loc']) or '(top level)'}': {e['msg']}" for e in error.errors()
            )
            raise TaskSpecError(f"{path}: {problems}") from error


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
