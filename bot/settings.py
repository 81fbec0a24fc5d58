"""Configuration from the environment and ``.env`` (pydantic-settings).

Only the composition root (``bot``) reads :class:`Settings`; lower packages take explicit arguments, so
``learning``, ``imagine`` and ``storage`` stay usable as libraries. Secrets are :class:`~pydantic.SecretStr`
and never appear in ``repr``, logs or ``/status``.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from learning.algorithms import DEFAULT_ALGORITHM, Algorithm
from learning.interface import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K


class Settings(BaseSettings):
    """Every setting of Reverie; ``.env.example`` lists them with a comment each."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- storage -------------------------------------------------------------------------------------
    data_dir: Path = Field(default=Path("data"), description="Where the database, checkpoints and caches live.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir.")

    # --- model ---------------------------------------------------------------------------------------
    base_model: str = Field(default="smollm2", description="'smollm2' (bundled), a local directory or a hub id.")
    model_cache_dir: Path | None = Field(default=None, description="Converted base models; default data_dir/models.")
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda'.")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for serving; default all the cores, half while an improvement run trains.",
    )
    task: str = Field(default="travel", description="Task spec served by the bot: built-in name or TOML path.")

    # --- decoding ------------------------------------------------------------------------------------
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=1024)
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, le=5.0)
    top_k: int = Field(default=DEFAULT_TOP_K, ge=0)
    beta: float | None = Field(default=None, description="ILQL advantage weight; default: the checkpoint's.")

    # --- imagination ---------------------------------------------------------------------------------
    imagine_backend: Literal["auto", "local", "openai", "scripted"] = Field(
        default="auto",
        description="'auto': an LLM server if configured, else scripted simulators for built-in tasks, else the "
        "local base model (bot.imagination.choose_imagination); or one of them by name.",
    )
    openai_base_url: str | None = Field(default=None, description="Any OpenAI-compatible server.")
    openai_api_key: SecretStr | None = None
    openai_model: str = "gpt-4o-mini"
    openai_concurrency: int = Field(default=16, ge=1, le=512)
    openai_timeout_s: float = Field(default=60.0, gt=0)
    openai_max_retries: int = Field(default=5, ge=0)

    # --- platforms -----------------------------------------------------------------------------------
    telegram_token: SecretStr | None = None
    telegram_base_url: str | None = Field(default=None, description="Bot API base URL (self-hosted/test).")
    discord_token: SecretStr | None = None
    discord_guild_id: int | None = Field(default=None, description="Sync slash commands to this guild instantly.")
    admin_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Admins as 'platform:user_id' (e.g. telegram:123, discord:456, console:local).",
    )
    telegram_webhook_url: str | None = Field(
        default=None,
        description="Public HTTPS URL Telegram posts updates to (behind a load balancer); set: webhooks on the "
        "HTTP server (HTTP_PORT) instead of long polling; its path is the route served.",
    )
    telegram_webhook_secret: SecretStr | None = Field(
        default=None,
        description="Secret token Telegram sends with every webhook request (1-256 of A-Z a-z 0-9 _ -); "
        "required with TELEGRAM_WEBHOOK_URL, the same on every replica.",
    )
    discord_shard_count: int | None = Field(
        default=None, ge=1, description="Total Discord shards across all replicas (unset: one process, auto)."
    )
    discord_shard_ids: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Shards this replica runs, e.g. '0,1' (needs DISCORD_SHARD_COUNT; empty: all of them).",
    )
    session_idle_minutes: float = Field(default=30.0, gt=0)
    max_message_chars: int = Field(default=4000, ge=1)

    # --- improvement loop ----------------------------------------------------------------------------
    improve_enabled: bool = True
    improve_cron: str = Field(default="0 3 * * *", description="Cron expression (UTC) for improvement runs.")
    improve_on_first_start: bool = True
    improve_imagined: int | None = Field(
        default=None,
        ge=0,
        description="Fresh imagined dialogues per run (None: by source, bot.imagination.IMAGINED_PER_RUN).",
    )
    improve_imagined_pool: int = Field(
        default=4800, ge=1, description="Imagined dialogues a run trains on at most: the newest (bounds training time)."
    )
    improve_real_ratio: float = Field(default=0.3, ge=0.0, le=1.0)
    improve_algo: Algorithm = DEFAULT_ALGORITHM
    improve_steps: int | None = Field(default=None, ge=1, description="Policy steps at most (default: the trainer's).")
    improve_value_steps: int | None = Field(default=None, ge=0, description="ILQL value-stage steps.")
    improve_time_limit_minutes: float = Field(default=120.0, gt=0)
    improve_eval_episodes: int = Field(
        default=100, ge=1, description="Episodes per policy in the gate (the same personas for candidate and active)."
    )
    improve_margin: float = Field(default=0.02, ge=0.0, description="Promote unless worse by more than this.")
    improve_from: Literal["active", "base"] = "active"
    improve_lend_cpus_after_s: float | None = Field(
        default=30.0,
        ge=0.0,
        description="Lend a run's confined children every CPU once no chat was handled for this long (None: never).",
    )
    keep_versions: int = Field(default=5, ge=1, description="Policy versions kept for rollback.")

    # --- operations ----------------------------------------------------------------------------------
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the HTTP server (/healthz, /readyz, /metrics, webhooks, operator page); unset: off.",
    )
    http_host: str = Field(default="0.0.0.0", description="Address the HTTP server listens on.")
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for the operator page's actions (rollback/activate); unset: the page is read-only.",
    )

    log_level: str = "INFO"

    @field_validator(
        "openai_api_key",
        "telegram_token",
        "discord_token",
        "database_url",
        "openai_base_url",
        "telegram_base_url",
        "discord_guild_id",
        "model_cache_dir",
        "beta",
        "improve_value_steps",
        "improve_imagined",
        "improve_lend_cpus_after_s",
        "telegram_webhook_url",
        "telegram_webhook_secret",
        "discord_shard_count",
        "http_port",
        "admin_token",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `TELEGRAM_TOKEN=` in .env means "no token", not an empty token.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _split_admins(cls, value: object) -> object:
        # Allow ADMIN_IDS=telegram:1,discord:2 as well as a JSON list.
        if isinstance(value, str) and not value.strip().startswith("["):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _split_shards(cls, value: object) -> object:
        # DISCORD_SHARD_IDS=0,1 as well as a JSON list.
        if isinstance(value, str) and not value.strip().startswith("["):
            return [int(item) for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _check_deployment(self) -> Settings:
        if self.telegram_webhook_url is not None:
            if self.telegram_webhook_secret is None:
                raise ValueError("TELEGRAM_WEBHOOK_URL needs TELEGRAM_WEBHOOK_SECRET (checked on every request)")
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", self.telegram_webhook_secret.get_secret_value()):
                raise ValueError("TELEGRAM_WEBHOOK_SECRET: 1-256 characters of A-Z, a-z, 0-9, _ and -")
            if self.http_port is None:
                raise ValueError("TELEGRAM_WEBHOOK_URL needs HTTP_PORT: webhooks arrive on the HTTP server")
        if self.discord_shard_ids:
            if self.discord_shard_count is None:
                raise ValueError("DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT")
            if any(not 0 <= shard < self.discord_shard_count for shard in self.discord_shard_ids):
                raise ValueError("DISCORD_SHARD_IDS must lie in 0 .. DISCORD_SHARD_COUNT-1")
        return self

    @cached_property
    def resolved_database_url(self) -> str:
        """``database_url`` or the default SQLite file inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'reverie.db').resolve()}"

    @property
    def resolved_torch_threads(self) -> int:
        """Serving threads while an improvement run's child runs (:func:`bot.subprocesses.serving_threads`): half
        the CPUs this process may use, so a training child never oversubscribes them (on 2 shared cores, 2
        spinning OpenMP threads are ~20x slower than 1)."""
        from bot.subprocesses import serving_threads

        return serving_threads(self.torch_threads)

    @property
    def resolved_idle_torch_threads(self) -> int:
        """Serving threads while no child runs (:func:`bot.subprocesses.idle_serving_threads`): every CPU this
        process may use — on 2 cores, 8 concurrent chats' p50 0.92 s against 1.70 s on one thread."""
        from bot.subprocesses import idle_serving_threads

        return idle_serving_threads(self.torch_threads)

    @property
    def resolved_model_cache_dir(self) -> Path:
        """Directory for converted base models."""
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def checkpoints_dir(self) -> Path:
        """Directory for trained policy checkpoints."""
        return self.data_dir / "policies"

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables, for child processes (secrets included: never log this)."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ",".join(str(item) for item in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[name.upper()] = str(value)
        env["DATABASE_URL"] = self.resolved_database_url
        return env

    def is_admin(self, platform: str, user_id: str | int) -> bool:
        """Whether ``platform:user_id`` is a configured admin."""
        return f"{platform}:{user_id}" in self.admin_ids
