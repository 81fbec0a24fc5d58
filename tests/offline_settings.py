"""Bot settings for tests of the improvement loop: no LLM server, no `.env`, no first-start run, one admin."""

from __future__ import annotations

from pathlib import Path

from bot.settings import Settings


def offline_settings(tmp_path: Path, **values: object) -> Settings:
    """Settings under ``tmp_path`` with no OpenAI-compatible server configured (``values`` override)."""
    defaults: dict[str, object] = {
        "data_dir": tmp_path,
        "base_model": "tiny",
        "admin_ids": ["telegram:7"],
        "improve_on_first_start": False,
        "openai_base_url": None,
        "openai_api_key": None,
        "log_level": "WARNING",
    }
    return Settings(_env_file=None, **{**defaults, **values})
