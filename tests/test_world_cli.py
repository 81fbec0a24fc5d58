"""``reverie world check|enrich``: a task's world shown, and enriched once by an LLM into a file the author reviews;
the real openai client talks to the fake server, and every line it returns is checked before use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from bot.cli import app
from imagine.task import load_task, world_file
from imagine.world import world_for
from tests.fakes.openai_server import FakeOpenAIServer, serve_in_thread
from tests.test_world import NAMES_ONLY

#: What the fake server's "model" says per dimension; one reply of 'frame size' gives another dimension's value
#: (it must be dropped), and the budget answer is not JSON at all (that dimension keeps its names).
DETAILS: dict[str, dict[str, Any]] = {
    "terrain": {
        "role": "preference",
        "questions": ["Where do you mostly ride?", "What kind of ground will you ride on?"],
        "question_words": ["ride on", "mostly ride", "ground"],
        "values": [
            {
                "value": "city streets",
                "says": ["Mostly commuting in town.", "City streets."],
                "words": ["town", "commut"],
                "fits": ["a city commuter"],
                "clashes": ["knobbly tyres"],
            },
            {
                "value": "mountain trails",
                "says": ["Trails in the hills.", "Off-road in the mountains."],
                "words": ["trail", "off-road", "hills"],
                "fits": ["a full-suspension mountain bike"],
            },
            {
                "value": "gravel roads",
                "says": ["Gravel paths, mostly.", "Dirt and gravel roads."],
                "words": ["gravel", "dirt"],
                "fits": ["a gravel bike"],
            },
        ],
    },
    "frame size": {
        "role": "preference",
        "questions": ["How tall are you?", "What frame size do you ride?"],
        "question_words": ["tall", "frame"],
        "values": [
            {
                "value": "small",
                "says": ["I'm quite short.", "Small, I think.", "Small, and I ride gravel."],
                "words": ["short", "small"],
                "fits": ["in a small frame"],
            },
            {
                "value": "medium",
                "says": ["Average height.", "Medium."],
                "words": ["average", "medium"],
                "fits": ["in a medium frame"],
            },
            {
                "value": "large",
                "says": ["I'm very tall.", "Large, please."],
                "words": ["very tall", "large"],
                "fits": ["in a large frame"],
            },
        ],
    },
}


def responder(body: dict[str, Any]) -> str:
    prompt = body["messages"][-1]["content"]
    dimension = re.search(r"One way users differ is '([^']+)'", prompt).group(1)  # type: ignore[union-attr]
    return json.dumps(DETAILS[dimension]) if dimension in DETAILS else "Sorry, I can't help with that."


def test_enrich_writes_a_checked_file_the_task_then_uses(tmp_path: Path) -> None:
    task = tmp_path / "bikes.toml"
    task.write_text(NAMES_ONLY, encoding="utf-8")
    with serve_in_thread(FakeOpenAIServer(responder)) as server:
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test", "DATA_DIR": str(tmp_path / "data")}
        result = CliRunner().invoke(app, ["world", "enrich", "--task", str(task)], env=env)
        assert result.exit_code == 0, result.output
        assert "dropped" in result.output and "Small, and I ride gravel." in result.output
        assert "budget: the server's answer was unusable" in result.output
        again = CliRunner().invoke(app, ["world", "enrich", "--task", str(task)], env=env)
        assert again.exit_code == 2 and "exists" in again.output  # never overwritten without --force
    written = world_file(task).read_text(encoding="utf-8")
    assert "Mostly commuting in town." in written and "Small, and I ride gravel." not in written
    world = world_for(load_task(task))
    terrain = world.attribute("terrain")
    assert terrain.questions[0] == "Where do you mostly ride?"
    assert world.read_answers("Off-road in the mountains, please") == {"terrain": "mountain trails"}
    assert world.attribute("budget").value("low").says[0] == "Low."  # no details: the names still work
    check = CliRunner().invoke(app, ["world", "check", "--task", str(task)])
    assert check.exit_code == 0, check.output
    assert "18 value combinations" in check.output and "fit" in check.output


def test_enrich_needs_a_server_and_check_names_what_to_fix(tmp_path: Path) -> None:
    task = tmp_path / "bikes.toml"
    task.write_text(NAMES_ONLY, encoding="utf-8")
    env = {"OPENAI_BASE_URL": "", "OPENAI_API_KEY": "", "DATA_DIR": str(tmp_path / "data")}
    refused = CliRunner().invoke(app, ["world", "enrich", "--task", str(task)], env=env)
    assert refused.exit_code == 2 and "no LLM server configured" in refused.output
    task.write_text(NAMES_ONLY.replace('"budget (low, high)"', '"budget"'), encoding="utf-8")
    broken = CliRunner().invoke(app, ["world", "check", "--task", str(task)], env=env)
    assert broken.exit_code == 2 and "'budget' lists no values" in broken.output


def test_imagine_and_eval_take_a_task_given_by_path(tmp_path: Path) -> None:
    task = tmp_path / "bikes.toml"
    task.write_text(NAMES_ONLY, encoding="utf-8")
    env = {"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": "", "OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""}
    env |= {"IMAGINE_BACKEND": "auto", "LOG_LEVEL": "WARNING"}
    imagined = CliRunner().invoke(app, ["imagine", "--task", str(task), "--n", "5", "--seed", "1"], env=env)
    assert imagined.exit_code == 0, imagined.output
    assert "imagining with scripted" in imagined.output and "'bikes' compiles into a" in imagined.output
    args = ["eval", "--task", str(task), "--policy", "scripted:careful", "--policy", "scripted:eager"]
    evaluated = CliRunner().invoke(
        app, [*args, "--episodes", "8", "--no-store", "--out", str(tmp_path / "out")], env=env
    )
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"] == "bikes" and report["split"] == "heldout"
    assert {p["name"]: p["success_rate"] for p in report["policies"]}["scripted:careful"] == 1.0
