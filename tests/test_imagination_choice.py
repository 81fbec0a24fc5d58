"""Which source imagines an improvement run's dialogues (``bot.imagination.choose_imagination``): the choice for
each case, the log line at the start of a run, the run record and ``/status``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.events import ChatRef
from bot.imagination import IMAGINED_PER_RUN, chat_backend, choose_imagination
from bot.improve import ImprovementLoop
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from imagine.task import TaskSpec, load_task
from storage import RunStatus, Store
from tests.offline_settings import offline_settings
from tests.test_service import ScriptedPolicy

ADMIN = ChatRef(platform="telegram", chat_id="7", user_id="7")
TRAVEL_TOML = Path(__file__).resolve().parents[1] / "imagine" / "tasks" / "travel.toml"


def _settings(tmp_path: Path, **values: object) -> Settings:
    return offline_settings(tmp_path, **{"base_model": "smollm2", **values})


@pytest.fixture
def custom_task(tmp_path: Path) -> TaskSpec:
    """A task of the user's own given by path: the travel spec under another name (it compiles into a world)."""
    path = tmp_path / "gift.toml"
    path.write_text(TRAVEL_TOML.read_text(encoding="utf-8").replace('name = "travel"', 'name = "gift"', 1))
    task = load_task(path)
    assert task.name == "gift"
    return task


@pytest.fixture
def worldless_task(tmp_path: Path) -> TaskSpec:
    """A task whose persona hints list no values: no world compiles from it."""
    path = tmp_path / "muse.toml"
    text = TRAVEL_TOML.read_text(encoding="utf-8").split("\n# --- The compiled world")[0]
    start, end = text.index("persona_hints = ["), text.index("critique_criteria")
    text = text[:start] + 'persona_hints = ["taste", "mood"]\n' + text[end:]
    path.write_text(text.replace('name = "travel"', 'name = "muse"', 1))
    return load_task(path)


def test_default_is_auto() -> None:
    assert Settings(_env_file=None).imagine_backend == "auto"


@pytest.mark.parametrize("task", ["travel", "teaching", "gift"])
def test_every_task_with_a_world_imagines_with_its_scripted_agents(
    tmp_path: Path, task: str, custom_task: TaskSpec
) -> None:
    spec = custom_task if task == "gift" else load_task(task)
    choice = choose_imagination(_settings(tmp_path), spec)
    assert choice.backend == "scripted" and choice.warning is None and choice.also is None
    assert "compiles into a world" in choice.reason and spec.name in choice.reason


def test_a_task_without_a_world_and_no_server_uses_the_bundled_model_with_a_warning(
    tmp_path: Path, worldless_task: TaskSpec
) -> None:
    choice = choose_imagination(_settings(tmp_path), worldless_task)
    assert choice.backend == "local" and "'taste' lists no values" in choice.reason
    assert choice.warning is not None and "weak dialogues" in choice.warning and "OPENAI_BASE_URL" in choice.warning
    # Another local model than the bundled one: no warning about the bundled one's quality.
    assert choose_imagination(_settings(tmp_path, base_model="/models/qwen-7b"), worldless_task).warning is None


@pytest.mark.parametrize("server", [{"openai_base_url": "http://127.0.0.1:8000/v1"}, {"openai_api_key": "sk-x"}])
def test_a_configured_server_is_mixed_in_or_imagines_alone(
    tmp_path: Path, server: dict[str, str], custom_task: TaskSpec, worldless_task: TaskSpec
) -> None:
    settings = _settings(tmp_path, **server)
    for spec in (load_task("travel"), custom_task):
        choice = choose_imagination(settings, spec)
        assert choice.backend == "scripted" and choice.also == "openai" and "mixed in" in choice.reason
    alone = choose_imagination(settings, worldless_task)
    assert alone.backend == "openai" and alone.also is None and "LLM server is configured" in alone.reason
    assert chat_backend(settings) == "openai"


def test_an_explicit_backend_is_obeyed(tmp_path: Path, worldless_task: TaskSpec) -> None:
    server = {"openai_base_url": "http://127.0.0.1:8000/v1"}
    travel = load_task("travel")
    assert choose_imagination(_settings(tmp_path, imagine_backend="local", **server), travel).backend == "local"
    assert choose_imagination(_settings(tmp_path, imagine_backend="openai"), travel).backend == "openai"
    wrong = choose_imagination(_settings(tmp_path, imagine_backend="scripted"), worldless_task)
    assert wrong.backend == "scripted" and wrong.warning and "lists no values" in wrong.warning
    # LLM-driven users need a chat model, never the scripted source.
    assert chat_backend(_settings(tmp_path, imagine_backend="scripted")) == "local"


async def _run_until_imagination(loop: ImprovementLoop) -> None:
    """Start a run and stop it as its first step begins (the choice is made and logged before)."""

    def stop(step: str) -> None:
        raise RuntimeError(f"stopped at {step}")

    loop.on_step = stop
    run = await loop.run_once(trigger="test")
    assert run.status == RunStatus.FAILED and "stopped at imagine" in run.error


async def test_each_run_logs_and_records_its_choice_and_status_shows_it(
    sqlite_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    loop = ImprovementLoop(store=sqlite_store, settings=settings, task=load_task("travel"))
    with caplog.at_level(logging.INFO, logger="bot.improve"):
        await _run_until_imagination(loop)
    [line] = [r for r in caplog.records if "imagines" in r.getMessage()]
    assert line.levelno == logging.INFO and "with scripted (IMAGINE_BACKEND=auto" in line.getMessage()
    run = await sqlite_store.last_training_run()
    assert run.config["backend"] == "scripted" and "compiles into a world" in run.config["backend_reason"]
    # Scripted dialogues cost seconds: a run imagines thousands by default, enough for imitation to learn the task.
    assert run.config["imagined"] == IMAGINED_PER_RUN["scripted"] == 2400

    service = DialogueService(
        store=sqlite_store, policies=PolicyHolder(ScriptedPolicy()), task=loop.task, settings=settings, improver=loop
    )
    status = "\n".join(reply.text for reply in await service.handle_command(ADMIN, "status"))
    assert (
        "Imagination: 2400 dialogues per run from scripted (IMAGINE_BACKEND=auto: task 'travel' compiles into a world"
        in status
    )
    await service.shutdown()


async def test_a_run_for_a_task_without_a_world_warns_about_the_bundled_model(
    sqlite_store: Store, tmp_path: Path, worldless_task: TaskSpec, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    loop = ImprovementLoop(store=sqlite_store, settings=settings, task=worldless_task)
    with caplog.at_level(logging.INFO, logger="bot.improve"):
        await _run_until_imagination(loop)
    [line] = [r for r in caplog.records if "imagines" in r.getMessage()]
    assert line.levelno == logging.WARNING and "with local" in line.getMessage()
    assert "weak dialogues" in line.getMessage()
    config = (await sqlite_store.last_training_run()).config
    assert config["backend"] == "local" and config["imagined"] == 60
    status = "\n".join(await loop.status_lines())
    assert "Imagination: 60 dialogues per run from local" in status
    assert "Warning: the bundled SmolLM2-135M writes weak dialogues" in status


async def test_status_says_when_imagination_is_off(sqlite_store: Store, tmp_path: Path) -> None:
    loop = ImprovementLoop(
        store=sqlite_store, settings=_settings(tmp_path, improve_imagined=0), task=load_task("travel")
    )
    assert "Imagination: off" in loop.imagination_line()


def test_imagine_cli_resolves_auto_to_the_scripted_source(tmp_path: Path) -> None:
    from bot.cli import app

    env = {"DATA_DIR": str(tmp_path), "DATABASE_URL": "", "OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""}
    env |= {"IMAGINE_BACKEND": "auto", "LOG_LEVEL": "WARNING"}
    result = CliRunner().invoke(app, ["imagine", "--task", "travel", "--n", "3", "--seed", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert "imagining with scripted" in result.output and "(scripted)" in result.output
