"""The process's HTTP server (bot.web): probes and Prometheus metrics, over real HTTP (httpx → uvicorn)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.events import ChatRef
from bot.policy_holder import PolicyHolder
from bot.server import Runtime, http_server
from bot.settings import Settings
from bot.web.health import ADAPTERS
from bot.web.metrics import BotMetrics, MeteredDialogueService
from imagine.task import load_task
from learning.interface import History
from storage import Database, RunStatus, Store
from tests.fakes.ports import free_port

TASK = load_task("travel")


class EchoPolicy:
    """A policy that answers at once with a fixed text."""

    def __init__(self, version_id: int | None = None) -> None:
        self.name = "echo"
        self.version_id = version_id

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        return ["Where would you like to go?" for _ in histories]

    async def respond(self, history: History) -> str:
        return "Where would you like to go?"

    def close(self) -> None:
        pass


def make_runtime(store: Store, **settings: object) -> Runtime:
    values: dict[str, object] = {"http_port": free_port(), "http_host": "127.0.0.1", **settings}
    config = Settings(_env_file=None, **values)
    metrics = BotMetrics()
    policies = PolicyHolder(EchoPolicy(version_id=None))
    service = MeteredDialogueService(metrics=metrics, store=store, policies=policies, task=TASK, settings=config)
    return Runtime(config, store, TASK, policies, service, lambda source, version: EchoPolicy(), metrics)


async def serving(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    base_url = f"http://127.0.0.1:{runtime.settings.http_port}"
    async with http_server(runtime, asyncio.Event()), httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        yield client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition: (name, sorted labels) → value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(autouse=True)
def fresh_adapter_health() -> None:
    ADAPTERS.__init__()  # type: ignore[misc]


async def test_probes_answer_and_readiness_waits_for_the_adapters(sqlite_store: Store) -> None:
    runtime = make_runtime(sqlite_store)
    async for client in serving(runtime):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"ready": True, "database": True, "policy": "echo", "adapters": {}}

        ADAPTERS.expect("telegram")
        waiting = await client.get("/readyz")
        assert waiting.status_code == 503
        assert waiting.json()["adapters"] == {"telegram": False}
        ADAPTERS.connected("telegram")
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/nothing-here")).status_code == 404  # no webhook registered there
    # stopped: nobody listens any more
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{runtime.settings.http_port}/healthz")


async def test_readiness_fails_when_the_database_does_not_answer(sqlite_store: Store) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        unreachable = Store(Database(f"postgresql://reverie:secret-password@127.0.0.1:{port}/reverie"))
        runtime = make_runtime(unreachable)
        async for client in serving(runtime):
            answer = await client.get("/readyz")
            assert answer.status_code == 503
            assert answer.json()["database"] is False
            assert "secret-password" not in answer.text
            assert (await client.get("/healthz")).status_code == 200  # up, only not ready
        await unreachable.database.dispose()


async def test_metrics_count_messages_latency_errors_runs_and_the_gate(sqlite_store: Store) -> None:
    runtime = make_runtime(sqlite_store)
    chat = ChatRef("telegram", "5", "5")
    for text in ("hello", "to Rome please"):
        replies = await runtime.service.handle_message(chat, text)
        assert replies[-1].text == "Where would you like to go?"
    await runtime.service.handle_message(ChatRef("discord", "6", "6"), "hi")
    await runtime.service.handle_message(chat, "")  # refused: an empty message
    await runtime.service.handle_command(chat, "help")
    rejected = await sqlite_store.start_training_run(trigger="manual")
    assert rejected.id is not None
    await sqlite_store.update_training_run(
        rejected.id, status=RunStatus.REJECTED, metrics={"paired_difference": -0.125}
    )
    failed = await sqlite_store.start_training_run(trigger="schedule")
    assert failed.id is not None
    await sqlite_store.update_training_run(failed.id, status=RunStatus.FAILED, error="boom")
    await sqlite_store.start_training_run(trigger="schedule")  # still running

    async for client in serving(runtime):
        logging.getLogger("bot.adapters.telegram").error("Handling a Telegram update failed")
        answer = await client.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        values = samples(answer.text)

    assert values[("reverie_handled_total", (("kind", "message"), ("platform", "telegram")))] == 3
    assert values[("reverie_handled_total", (("kind", "message"), ("platform", "discord")))] == 1
    assert values[("reverie_handled_total", (("kind", "command"), ("platform", "telegram")))] == 1
    # the refused empty message is counted and timed too: three telegram replies, one discord
    assert values[("reverie_reply_latency_seconds_count", (("platform", "telegram"),))] == 3
    assert values[("reverie_reply_latency_seconds_count", (("platform", "discord"),))] == 1
    assert values[("reverie_errors_total", (("kind", "message_refused_or_apology"),))] == 1
    assert values[("reverie_errors_total", (("kind", "log:bot.adapters"),))] == 1
    assert values[("reverie_active_policy_version", ())] == 0
    assert values[("reverie_improvement_runs", (("outcome", "rejected"),))] == 1
    assert values[("reverie_improvement_runs", (("outcome", "failed"),))] == 1
    assert values[("reverie_improvement_runs", (("outcome", "running"),))] == 1
    assert values[("reverie_improvement_runs", (("outcome", "succeeded"),))] == 0
    assert values[("reverie_last_gate_difference", ())] == -0.125


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"telegram_webhook_url": "https://bot.example.test/hook", "http_port": 8080}, "TELEGRAM_WEBHOOK_SECRET"),
        (
            {"telegram_webhook_url": "https://b.example.test/h", "telegram_webhook_secret": "ok-secret"},
            "HTTP_PORT",
        ),
        (
            {
                "telegram_webhook_url": "https://b.example.test/h",
                "telegram_webhook_secret": "no spaces",
                "http_port": 1,
            },
            "A-Z",
        ),
        ({"discord_shard_ids": "0,1"}, "DISCORD_SHARD_COUNT"),
        ({"discord_shard_ids": "2", "discord_shard_count": 2}, "0 .. DISCORD_SHARD_COUNT-1"),
    ],
)
def test_deployment_settings_that_cannot_work_are_refused(values: dict[str, object], complaint: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=complaint):
        Settings(_env_file=None, **values)


def test_deployment_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "HTTP_PORT": "8080",
        "TELEGRAM_WEBHOOK_URL": "https://bot.example.test/telegram/webhook",
        "TELEGRAM_WEBHOOK_SECRET": "s3cret_-token",
        "DISCORD_SHARD_COUNT": "4",
        "DISCORD_SHARD_IDS": "1,3",
        "ADMIN_TOKEN": "",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.http_port == 8080 and settings.discord_shard_ids == [1, 3] and settings.admin_token is None
    assert "s3cret_-token" not in repr(settings)
    assert settings.as_env()["DISCORD_SHARD_IDS"] == "1,3"
