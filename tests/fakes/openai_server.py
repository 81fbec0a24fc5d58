"""A fake OpenAI-compatible server (aiohttp on 127.0.0.1, port 0) for driving the real ``openai`` client offline.

It answers ``POST /v1/chat/completions`` (and ``GET /v1/models``) in OpenAI's shape with token usage, and can
be told to misbehave for the next requests: an HTTP status (429 with ``Retry-After``, 500, …), a body that is
not JSON, or a reply slower than the client's timeout. It records every request and the peak number of
requests in flight. What the "model" says comes from a ``responder`` (``body -> text``, sync or async);
:class:`ImaginationResponder` plays the three steps of Reverie's imagination pipeline.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Responder = Callable[[dict[str, Any]], "str | Awaitable[str]"]


@dataclass
class Fault:
    """How to misbehave for one request: an HTTP error, a body that is not JSON, or extra delay."""

    status: int | None = None
    retry_after: float | None = None
    malformed: bool = False
    delay_s: float = 0.0
    #: The error message of a ``status`` fault; ``{api_key}`` becomes the request's bearer token (as a real 401
    #: body quotes the key it rejected).
    message: str = "injected failure"


def echo_responder(body: dict[str, Any]) -> str:
    """The last user message, echoed."""
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return f"echo: {users[-1] if users else ''}"


class FakeOpenAIServer:
    """``async with FakeOpenAIServer() as server:`` then ``AsyncOpenAI(base_url=server.base_url, ...)``."""

    def __init__(
        self,
        responder: Responder = echo_responder,
        *,
        latency_s: float = 0.0,
        model: str = "fake-model",
        json_mode_supported: bool = True,
    ) -> None:
        self.responder = responder
        self.latency_s = latency_s
        self.model = model
        self.json_mode_supported = json_mode_supported
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: deque[Fault] = deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- scripting faults ----------------------------------------------------------------------------

    def fail_next(
        self, status: int, times: int = 1, *, retry_after: float | None = None, message: str = "injected failure"
    ) -> None:
        """Answer the next ``times`` requests with HTTP ``status`` (an OpenAI-style error body with ``message``)."""
        self._faults.extend(Fault(status=status, retry_after=retry_after, message=message) for _ in range(times))

    def malformed_next(self, times: int = 1) -> None:
        """Answer the next ``times`` requests with HTTP 200 and a body that is not JSON."""
        self._faults.extend(Fault(malformed=True) for _ in range(times))

    def delay_next(self, seconds: float, times: int = 1) -> None:
        """Answer the next ``times`` requests only after ``seconds`` (past a client's timeout, say)."""
        self._faults.extend(Fault(delay_s=seconds) for _ in range(times))

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What to pass as the client's ``base_url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- handlers ------------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self._faults.popleft() if self._faults else Fault()
            await asyncio.sleep(self.latency_s + fault.delay_s)
            if fault.status is not None:
                api_key = request.headers.get("Authorization", "").removeprefix("Bearer ")
                message = fault.message.replace("{api_key}", api_key)
                return self._error(fault.status, message, retry_after=fault.retry_after)
            if fault.malformed:
                self.statuses.append(200)
                return web.Response(text='{"id": "chatcmpl-broken", "choices": [', content_type="application/json")
            if body.get("response_format") and not self.json_mode_supported:
                return self._error(400, "Unsupported parameter: 'response_format'", param="response_format")
            text = self.responder(body)
            if inspect.isawaitable(text):
                text = await text
            self.statuses.append(200)
            return web.json_response(self._completion(body, str(text)))
        finally:
            self.in_flight -= 1

    def _completion(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion_tokens = len(text.split())
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _error(
        self, status: int, message: str, *, retry_after: float | None = None, param: str | None = None
    ) -> web.Response:
        self.statuses.append(status)
        headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
        payload = {"error": {"message": message, "type": "fake_error", "param": param, "code": str(status)}}
        return web.Response(status=status, text=json.dumps(payload), content_type="application/json", headers=headers)


@contextmanager
def serve_in_thread(server: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    """Run ``server`` on a loop of its own in a thread, for code under test that runs its own event loop (the CLI)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


class ImaginationResponder:
    """Plays an LLM for Reverie's imagination pipeline: personas as JSON, labelled dialogues, critiques.

    It recognises the step from the prompt. Dialogues differ by persona and outcome; ``messy`` adds the
    formatting real models produce (markdown labels, prose around the dialogue, code fences).
    """

    def __init__(self, *, messy: bool = False, critique_reply: str | None = None) -> None:
        self.messy = messy
        self.critique_reply = critique_reply
        self.calls: dict[str, int] = {"personas": 0, "dialogue": 0, "critique": 0, "other": 0}
        self._people = itertools.count()

    def __call__(self, body: dict[str, Any]) -> str:
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        if '"personas"' in prompt:
            self.calls["personas"] += 1
            return self._personas(prompt)
        if '"revised"' in prompt:
            self.calls["critique"] += 1
            return self.critique_reply if self.critique_reply is not None else self._critique(prompt)
        if "Write a conversation" in prompt:
            self.calls["dialogue"] += 1
            return self._dialogue(prompt)
        self.calls["other"] += 1
        return "I am not sure what you want."

    def _personas(self, prompt: str) -> str:
        match = re.search(r"Invent (\d+) personas", prompt)
        count = int(match.group(1)) if match else 8
        people = []
        for _ in range(count):
            k = next(self._people)
            interest = ["food", "history", "nature", "art", "nightlife", "adventure", "relaxation"][k % 7]
            budget = ["tight", "moderate", "generous"][(k // 7) % 3]
            people.append(
                {
                    "name": f"Person{k}",
                    "attributes": {"main interest": interest, "budget": budget, "number": str(k)},
                    "description": f"Person{k} loves {interest} and has a {budget} budget.",
                }
            )
        return json.dumps({"personas": people})

    def _dialogue(self, prompt: str) -> str:
        name = prompt.split("Name: ", 1)[1].split(".", 1)[0] if "Name: " in prompt else "Someone"
        success = "SUCCESS" in prompt
        ending = "That sounds perfect, thank you!" if success else "Hmm, that is not for me. I'm disappointed."
        lines = [
            ("Agent", "Hi! I'm your travel agent. What kind of trip are you planning?"),
            ("User", f"I'm {name}, planning a short trip."),
            ("Agent", "What do you enjoy doing most?"),
            ("User", f"Mostly things {name} would like."),
            ("Agent", "Then I recommend a guided walking tour."),
            ("User", ending),
        ]
        if not self.messy:
            return "\n".join(f"{who}: {text}" for who, text in lines)
        body = "\n".join(f"**{'Traveller' if who == 'User' else 'Travel agent'}:** {text}" for who, text in lines)
        return f"Sure! Here is the conversation:\n\n```\n{body}\n```\n\nI hope this helps."

    def _critique(self, prompt: str) -> str:
        dialogue = prompt.split("Conversation:\n", 1)[1].split("\n\n", 1)[0]
        revised = dialogue.replace("What do you enjoy doing most?", "What do you enjoy doing most on holiday?")
        return json.dumps({"problems": ["the agent's question was vague"], "revised": revised})
