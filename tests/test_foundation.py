"""Foundation: settings, base-model loading, the CLI surface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr
from typer.testing import CliRunner

from bot.cli import app
from bot.settings import Settings
from learning.base_model import (
    BUNDLED_ID,
    BaseModelError,
    bundled_gguf_path,
    load_base_model,
    resolve_model_path,
    tiny_model,
    tiny_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


def test_settings_read_env_and_dotenv_and_hide_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TELEGRAM_TOKEN=123:abc-secret\nADMIN_IDS=telegram:1, discord:2\nTOP_K=7\n")
    monkeypatch.setenv("TOP_K", "9")  # the environment wins over .env
    settings = Settings()
    assert isinstance(settings.telegram_token, SecretStr)
    assert settings.telegram_token.get_secret_value() == "123:abc-secret"
    assert "abc-secret" not in repr(settings) and "abc-secret" not in str(settings.model_dump())
    assert settings.admin_ids == ["telegram:1", "discord:2"]
    assert settings.is_admin("telegram", 1) and not settings.is_admin("telegram", 2)
    assert settings.top_k == 9
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'data' / 'reverie.db').resolve()}"


def test_settings_reject_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMPERATURE", "-1")
    with pytest.raises(ValueError, match="temperature"):
        Settings(_env_file=None)


def test_env_example_lists_every_setting() -> None:
    listed = {
        line.split("=", 1)[0].strip().lower()
        for line in (REPO / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert listed == set(Settings.model_fields)


def test_tiny_model_is_deterministic_and_speaks_chatml() -> None:
    first, tokenizer = tiny_model(seed=3)
    second, _ = tiny_model(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n"
    assert tokenizer.decode(tokenizer.encode("where do you like to travel?")) == "where do you like to travel?"
    assert tiny_tokenizer() is not tiny_tokenizer()  # callers may mutate their copy


def test_unknown_base_model_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="cannot load base model"):
        load_base_model(str(tmp_path))  # an empty directory is not a model


@pytest.mark.smollm2
def test_bundled_smollm2_loads_offline_and_generates(model_cache_dir: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert bundled_gguf_path().is_file()
    base = load_base_model("smollm2", cache_dir=model_cache_dir)
    assert base.model_id == BUNDLED_ID and base.model.config.vocab_size == 49152
    assert Path(resolve_model_path("smollm2", model_cache_dir), "config.json").is_file()
    encoded = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = base.model.generate(**encoded, max_new_tokens=12, do_sample=False)
    reply = base.tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply


def test_cli_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "chat", "train", "generate", "imagine", "dialogues", "eval", "improve", "policies", "db"):
        assert command in result.output


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for command in ("serve", "chat", "train", "generate", "imagine", "dialogues", "eval", "improve", "policies", "db"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    env = {**os.environ, "DATA_DIR": str(tmp_path), "DATABASE_URL": ""}
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "db", "upgrade"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    from alembic.script import ScriptDirectory

    from storage.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(f"sqlite:///{tmp_path / 'reverie.db'}")).get_current_head()
    assert head and f"at revision {head}" in result.stderr + result.stdout
    assert (tmp_path / "reverie.db").is_file()


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        _env_file=None, telegram_token="1:x", admin_ids=["telegram:1", "console:me"], beta=2.5, improve_enabled=False
    )
    for key, value in original.as_env().items():
        monkeypatch.setenv(key, value)
    again = Settings(_env_file=None)
    assert again.model_dump(exclude={"database_url"}) == original.model_dump(exclude={"database_url"})
    assert again.resolved_database_url == original.resolved_database_url  # children use the same database
    assert again.telegram_token.get_secret_value() == "1:x"
