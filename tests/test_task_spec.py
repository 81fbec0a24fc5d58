"""Task specs: the built-ins load, a user's TOML file works, and every mistake names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagine.personas import dimensions
from imagine.task import TaskSpec, TaskSpecError, builtin_tasks, load_task

VALID = """
[task]
name = "shop"
title = "Shop assistant"
agent_role = "a shop assistant"
agent_goal = "Find out what gift the customer needs, then suggest one."
user_role = "a customer looking for a gift"
success = "The suggestion fits the recipient."
failure = "The suggestion does not fit."
persona_hints = ["recipient (parent, child, friend)", "budget (small or large)", "taste"]
critique_criteria = ["The customer reveals details gradually."]
opening_line = "Hello! Who is the gift for?"
max_turns = 5
"""


def write(tmp_path: Path, text: str, name: str = "shop.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_tasks_load_with_their_new_fields() -> None:
    assert builtin_tasks() == ["teaching", "travel"]
    travel = load_task("travel")
    assert travel.name == "travel" and travel.max_turns == 8
    assert "Traveller" in travel.user_aliases and travel.act_instruction
    assert "tutor" in load_task("teaching").system_prompt


def test_a_user_task_file_loads_with_defaults(tmp_path: Path) -> None:
    spec = load_task(write(tmp_path, VALID))
    assert spec.name == "shop" and spec.max_turns == 5
    assert spec.user_aliases == [] and spec.act_instruction == "" and spec.agent_style == ""
    assert [(d.name, d.values) for d in dimensions(spec)] == [
        ("recipient", ("parent", "child", "friend")),
        ("budget", ("small", "large")),
        ("taste", ()),
    ]


def test_builtin_hint_values_with_quotes_and_commas_split_correctly() -> None:
    misconception = next(d for d in dimensions(load_task("teaching")) if d.name == "misconception")
    assert misconception.values == ("none", "RL needs no data", "behaviour cloning is RL", "rewards are labels")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda t: t.replace('name = "shop"\n', ""), "'name'"),
        (lambda t: t.replace('name = "shop"', 'name = "Shop Assistant!"'), "'name'"),
        (lambda t: t.replace("max_turns = 5", "max_turns = 1"), "'max_turns'"),
        (lambda t: t.replace("max_turns = 5", 'max_turns = "five"'), "'max_turns'"),
        (lambda t: t.replace('["The customer reveals details gradually."]', "[]"), "'critique_criteria'"),
        (lambda t: t.replace('"taste"', '"  "'), "'persona_hints'"),
        (lambda t: t + 'colour = "blue"\n', "'colour'"),
        (lambda t: t.replace('title = "Shop assistant"', 'title = ""'), "'title'"),
    ],
)  # fmt: skip
def test_invalid_fields_are_named_with_the_file(tmp_path: Path, edit, field: str) -> None:
    path = write(tmp_path, edit(VALID))
    with pytest.raises(TaskSpecError) as error:
        load_task(path)
    message = str(error.value)
    assert str(path) in message and f"field {field}" in message


def test_broken_toml_missing_file_and_unknown_name(tmp_path: Path) -> None:
    broken = write(tmp_path, VALID.replace('title = "Shop assistant"', "title = Shop assistant"))
    with pytest.raises(TaskSpecError, match="not valid TOML") as error:
        load_task(broken)
    assert str(broken) in str(error.value)
    with pytest.raises(TaskSpecError, match="no such task file"):
        load_task(tmp_path / "missing.toml")
    with pytest.raises(TaskSpecError, match="built-in tasks are teaching, travel"):
        load_task("cooking")


def test_a_spec_without_the_task_table_is_accepted(tmp_path: Path) -> None:
    spec = TaskSpec.from_toml(write(tmp_path, VALID.replace("[task]\n", "")))
    assert spec.title == "Shop assistant"
