"""The real ``openai`` client against a fake OpenAI-compatible server: retries, timeouts, JSON mode, usage."""

from __future__ import annotations

import asyncio

import pytest

from imagine.backends import BackendError, ChatBackend, make_backend
from imagine.backends.openai_backend import OpenAIBackend
from tests.fakes.openai_server import FakeOpenAIServer

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def backend(server: FakeOpenAIServer, **options) -> OpenAIBackend:
    settings = {"base_url": server.base_url, "model": "fake-model", "backoff_s": 0.01, "max_retries": 3, **options}
    made = make_backend("openai", **settings)
    assert isinstance(made, OpenAIBackend) and isinstance(made, ChatBackend)
    return made


async def test_completion_usage_and_request_shape() -> None:
    async with FakeOpenAIServer() as server:
        chat = backend(server)
        assert await chat.complete(HELLO, max_tokens=17, temperature=0.2) == "echo: hello there"
        sent = server.requests[-1]
        assert sent["model"] == "fake-model" and sent["max_tokens"] == 17 and sent["temperature"] == 0.2
        assert sent["messages"] == HELLO and "response_format" not in sent
        assert chat.usage.requests == 1 and chat.usage.prompt_tokens == 4 and chat.usage.completion_tokens == 3
        assert chat.usage.retries == 0 and chat.usage.as_dict()["total_tokens"] == 7
        await chat.aclose()


async def test_429_and_500_are_retried_with_backoff() -> None:
    async with FakeOpenAIServer() as server:
        chat = backend(server)
        server.fail_next(429, retry_after=0.05)
        server.fail_next(500)
        server.fail_next(503)
        assert await chat.complete(HELLO) == "echo: hello there"
        assert server.statuses == [429, 500, 503, 200]
        assert chat.usage.retries == 3 and chat.usage.failures == 0 and chat.usage.requests == 1
        await chat.aclose()


async def test_gives_up_after_max_retries_with_a_clear_error() -> None:
    async with FakeOpenAIServer() as server:
        chat = backend(server, max_retries=2)
        server.fail_next(500, times=5)
        with pytest.raises(BackendError, match=r"gave up after 3 attempts: InternalServerError \(500\)"):
            await chat.complete(HELLO)
        assert len(server.requests) == 3 and chat.usage.failures == 1
        assert await chat.complete(HELLO) == "echo: hello there"  # the next request is fine again
        await chat.aclose()


async def test_client_errors_are_not_retried() -> None:
    async with FakeOpenAIServer() as server:
        chat = backend(server)
        server.fail_next(400)
        with pytest.raises(BackendError, match="rejected"):
            await chat.complete(HELLO)
        server.fail_next(401)
        with pytest.raises(BackendError, match="401"):
            await chat.complete(HELLO)
        assert len(server.requests) == 2 and chat.usage.retries == 0
        await chat.aclose()


async def test_a_body_that_is_not_json_is_retried() -> None:
    async with FakeOpenAIServer() as server:
        chat = backend(server)
        server.malformed_next(2)
        assert await chat.complete(HELLO) == "echo: hello there"
        assert len(server.requests) == 3 and chat.usage.retries == 2
        server.malformed_next(10)
        with pytest.raises(BackendError, match="gave up"):
            await chat.complete(HELLO)
        await chat.aclose()


async def test_a_reply_slower_than_the_timeout_is_retried() -> None:
    async with FakeOpenAIServer() as server:
        chat = backend(server, timeout_s=0.2)
        server.delay_next(0.6)
        assert await chat.complete(HELLO) == "echo: hello there"
        assert chat.usage.retries == 1 and len(server.requests) == 2
        server.delay_next(0.6, times=4)
        with pytest.raises(BackendError, match="APITimeoutError"):
            await chat.complete(HELLO)
        await chat.aclose()


async def test_json_mode_is_requested_and_dropped_where_unsupported() -> None:
    async with FakeOpenAIServer(lambda body: '{"ok": true}') as server:
        chat = backend(server)
        assert await chat.complete(HELLO, json_mode=True) == '{"ok": true}'
        assert server.requests[-1]["response_format"] == {"type": "json_object"}
        assert chat.supports_json_mode is True
        await chat.aclose()
    async with FakeOpenAIServer(lambda body: '{"ok": true}', json_mode_supported=False) as server:
        chat = backend(server)
        assert await chat.complete(HELLO, json_mode=True) == '{"ok": true}'
        assert chat.supports_json_mode is False
        assert [("response_format" in r) for r in server.requests] == [True, False]
        await chat.complete(HELLO, json_mode=True)  # remembered: no second rejected request
        assert [("response_format" in r) for r in server.requests] == [True, False, False]
        await chat.aclose()


async def test_concurrency_is_bounded() -> None:
    async with FakeOpenAIServer(latency_s=0.05) as server:
        chat = backend(server, concurrency=3)
        replies = await asyncio.gather(*(chat.complete([{"role": "user", "content": str(i)}]) for i in range(12)))
        assert replies == [f"echo: {i}" for i in range(12)]
        assert server.max_in_flight == 3
        await chat.aclose()


async def test_unreachable_server_fails_cleanly() -> None:
    async with FakeOpenAIServer() as server:
        url = server.base_url
    chat = make_backend("openai", base_url=url, max_retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(BackendError, match="APIConnectionError"):
        await chat.complete(HELLO)
    await chat.aclose()


def test_unknown_backend_kind_and_local_without_model() -> None:
    with pytest.raises(BackendError, match="unknown backend 'gpt'"):
        make_backend("gpt")
    with pytest.raises(BackendError, match="needs model="):
        make_backend("local")
