"""The operator page over real HTTP (httpx → uvicorn): what it shows, and that its actions need the admin token."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import httpx
import pytest

from bot.server import http_server
from storage import PolicyStatus, Store
from tests.operator_fixtures import ADMIN_TOKEN, runtime_with_history


async def test_the_page_shows_versions_runs_the_curve_and_conversations(sqlite_store: Store, tmp_path: Path) -> None:
    runtime = await runtime_with_history(sqlite_store, tmp_path)
    async with (
        http_server(runtime, asyncio.Event()),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.settings.http_port}") as client,
    ):
        page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert 'name="viewport"' in text  # usable on a phone
    assert "v3</td><td>active (serving here)" in text
    assert 'value="activate:1"' in text and 'value="activate:3"' not in text  # the serving one has no button
    assert "+5.0 pts [-1.0, +11.0]" in text  # the gate's paired difference and interval
    assert text.count("<svg") == 2 and text.count("<circle") == 3 + 1  # 3 versions; rewards all on one day
    assert "not better" in text and "train 640 s" in text
    assert "1 👍 / 0 👎" in text and "0 👍 / 1 👎" in text and "+1.00" in text
    assert ADMIN_TOKEN not in text


async def test_actions_need_the_admin_token(sqlite_store: Store, tmp_path: Path) -> None:
    runtime = await runtime_with_history(sqlite_store, tmp_path)
    async with (
        http_server(runtime, asyncio.Event()),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.settings.http_port}") as client,
    ):
        for token in ("", "wrong", ADMIN_TOKEN[:-1]):
            refused = await client.post("/actions", data={"token": token, "action": "rollback"})
            assert refused.status_code == 403 and "Refused" in refused.text
        assert runtime.policies.version_id == 3

        rolled = await client.post("/actions", data={"token": ADMIN_TOKEN, "action": "rollback"})
        assert rolled.status_code == 200, rolled.text
        assert runtime.policies.version_id == 2
        assert (await sqlite_store.active_policy_version()).id == 2  # type: ignore[union-attr]

        activated = await client.post("/actions", data={"token": ADMIN_TOKEN, "action": "activate:1"})
        assert "Version 1 is active now." in activated.text
        assert runtime.policies.version_id == 1
        assert (await sqlite_store.get_policy_version(2)).status == PolicyStatus.RETIRED  # type: ignore[union-attr]


async def test_the_admin_token_never_reaches_the_logs(
    sqlite_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = await runtime_with_history(sqlite_store, tmp_path)
    async with http_server(runtime, asyncio.Event()):
        logging.getLogger("bot.web").warning("a careless line with %s in it", ADMIN_TOKEN)
    assert "a careless line" in caplog.text
    assert ADMIN_TOKEN not in caplog.text


async def test_without_an_admin_token_configured_the_page_is_read_only(sqlite_store: Store, tmp_path: Path) -> None:
    runtime = await runtime_with_history(sqlite_store, tmp_path, admin_token=None)
    async with (
        http_server(runtime, asyncio.Event()),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.settings.http_port}") as client,
    ):
        assert "Read-only" in (await client.get("/")).text
        refused = await client.post("/actions", data={"token": "", "action": "activate:1"})
        assert refused.status_code == 403 and "ADMIN_TOKEN is not set" in refused.text
    assert runtime.policies.version_id == 3


async def test_the_steps_of_a_run_are_timed_on_the_page_and_in_metrics(sqlite_store: Store, tmp_path: Path) -> None:
    runtime = await runtime_with_history(sqlite_store, tmp_path)
    assert runtime.metrics is not None
    loop = runtime.service.improver
    seen: list[str] = []
    loop.on_step = seen.append  # type: ignore[union-attr]
    runtime.metrics.observe_improver(loop)
    run = await sqlite_store.start_training_run(trigger="manual")
    for step in ("imagine", "select", "train"):
        loop.on_step(step)  # type: ignore[union-attr]
    assert seen == ["imagine", "select", "train"]  # the loop's own observer still hears every step
    async with (
        http_server(runtime, asyncio.Event()),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.settings.http_port}") as client,
    ):
        page = (await client.get("/")).text
        metrics = (await client.get("/metrics")).text
    row = next(line for line in page.split("<tr>") if line.startswith(f"<td>#{run.id}</td>"))
    assert re.search(r"imagine \d+ s, select \d+ s, train …", row)  # train still running: no end yet
    assert 'reverie_improvement_step_seconds{step="imagine"}' in metrics
    assert 'reverie_improvement_step_seconds{step="select"}' in metrics
    assert 'step="train"' not in metrics
