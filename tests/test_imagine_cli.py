"""``reverie imagine`` and ``reverie dialogues export|import`` through the real CLI, on a fresh data directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from tests.fakes.openai_server import FakeOpenAIServer, ImaginationResponder, serve_in_thread


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return {"DATA_DIR": str(tmp_path / "data"), "BASE_MODEL": "tiny", "LOG_LEVEL": "WARNING"}


def invoke(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(app, args, env=env)


def flat(text: str) -> str:
    """Rich wraps long lines; compare with single spaces."""
    return " ".join(text.split())


def test_imagine_with_an_openai_compatible_server_then_export(env: dict[str, str], tmp_path: Path) -> None:
    with serve_in_thread(FakeOpenAIServer(ImaginationResponder(messy=True))) as server:
        env = {**env, "OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "fake-model", "OPENAI_API_KEY": "sk-secret"}
        result = invoke(["imagine", "--task", "travel", "--n", "4", "--backend", "openai", "--seed", "1"], env)
        assert result.exit_code == 0, result.output
        assert "travel-seed1" in result.output and "4 / 4" in result.output
        assert "sk-secret" not in result.output
        again = invoke(["imagine", "--task", "travel", "--n", "4", "--backend", "openai", "--seed", "1"], env)
        assert again.exit_code == 0 and "stored by earlier runs with this id" in again.output
        assert len([r for r in server.requests if "Write a conversation" in str(r)]) == 4  # nothing re-imagined
    out = tmp_path / "out" / "dialogues.jsonl"
    exported = invoke(["dialogues", "export", "--format", "jsonl", "--source", "imagined", "--out", str(out)], env)
    assert exported.exit_code == 0, exported.output
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    record = json.loads(lines[0])
    assert record["source"] == "imagined" and record["meta"]["backend"] == "openai"
    assert record["meta"]["model"] == "fake-model" and record["turns"][0]["role"] == "agent"
    assert not invoke(["dialogues", "export", "--source", "real", "--out", str(out)], env).exit_code
    assert out.read_text() == ""


def test_scripted_backend_export_to_stdout_and_import_with_bad_lines(env: dict[str, str], tmp_path: Path) -> None:
    result = invoke(["imagine", "--task", "teaching", "--n", "5", "--backend", "scripted", "--seed", "2"], env)
    assert result.exit_code == 0, result.output
    stdout = CliRunner().invoke(app, ["dialogues", "export", "--task", "teaching"], env=env)
    assert stdout.exit_code == 0
    lines = [line for line in stdout.stdout.splitlines() if line.strip()]
    assert len(lines) == 5 and all(json.loads(line)["task"] == "teaching" for line in lines)

    mine = json.loads(lines[0])
    mine["turns"][1]["text"] = "a different answer, so not a duplicate"
    bad = ["{not json", json.dumps({"turns": []}), json.dumps({**mine, "turns": [{"role": "narrator", "text": "x"}]})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([*lines, json.dumps(mine), "", *bad, json.dumps({**mine, "source": "dream"})]) + "\n")
    imported = invoke(["dialogues", "import", str(path)], env)
    assert imported.exit_code == 1  # some lines were bad; the good ones are kept
    assert "imported 1 dialogues, 5 already in the database, 4 bad lines skipped" in flat(imported.output)
    for line_number in (8, 9, 10, 11):
        assert f"in.jsonl:{line_number}:" in imported.output
    assert "role must be 'user' or 'agent'" in flat(imported.output)
    recount = CliRunner().invoke(app, ["dialogues", "export", "--task", "teaching"], env=env)
    assert len([line for line in recount.stdout.splitlines() if line.strip()]) == 6


def test_bad_arguments_are_reported(env: dict[str, str], tmp_path: Path) -> None:
    unknown = invoke(["imagine", "--task", "cooking", "--n", "2", "--backend", "scripted"], env)
    assert unknown.exit_code == 2 and "unknown task 'cooking'" in flat(unknown.output)
    backend = invoke(["imagine", "--task", "travel", "--n", "2", "--backend", "gpt"], env)
    assert backend.exit_code == 2 and "--backend must be one of" in flat(backend.output)
    missing = invoke(["dialogues", "import", str(tmp_path / "nope.jsonl")], env)
    assert missing.exit_code == 2 and "cannot read" in flat(missing.output)
    fmt = invoke(["dialogues", "export", "--format", "csv"], env)
    assert fmt.exit_code == 2
