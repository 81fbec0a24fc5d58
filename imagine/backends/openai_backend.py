"""Any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, llama.cpp) through the official async client.

Concurrency is bounded by a semaphore; 429, 5xx, timeouts, dropped connections and malformed bodies are retried by
``tenacity`` with exponential backoff and jitter (a server's ``Retry-After`` is honoured, capped); every other error
fails the one request, never the batch. JSON mode is asked for with ``response_format``; a server that rejects it is
remembered and asked without it, and callers parse the text robustly either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from imagine.backends.base import BackendError, ChatMessages, Usage

logger = logging.getLogger(__name__)

# A body that is not JSON (a proxy's error page, a truncated reply) is as transient as a 502.
_RETRIABLE = (
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APITimeoutError,
    openai.APIConnectionError,
    openai.APIResponseValidationError,
    json.JSONDecodeError,
)


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible ``base_url``."""

    name = "openai"
    writes_whole_dialogues = True

    def __init__(
        self,
        *,
        model: str = "gpt-4o-mini",
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        seed: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.model = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.usage = Usage()
        self.supports_json_mode: bool | None = None  # unknown until the server answers a JSON-mode request
        self._semaphore = asyncio.Semaphore(concurrency)
        self._jitter = random.Random(seed)
        # tenacity retries (the client's own retries would hide the count and skip malformed bodies).
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "not-needed",  # local servers accept anything; never logged
            timeout=timeout_s,
            max_retries=0,
        )

    async def complete(
        self,
        messages: ChatMessages,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        json_mode: bool = False,
    ) -> str:
        """One completion, retried on transient errors; :class:`BackendError` when it cannot be had."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._delay,
            retry=retry_if_exception_type(_RETRIABLE),
            before_sleep=self._before_retry,
            reraise=True,
        )
        async with self._semaphore:
            try:
                async for attempt in retrying:
                    with attempt:
                        return await self._create(messages, max_tokens, temperature, json_mode)
            except _RETRIABLE as error:
                self.usage.failures += 1
                tries = retrying.statistics.get("attempt_number", 1)
                raise BackendError(f"gave up after {tries} attempts: {_describe(error)}") from error
            except openai.BadRequestError as error:
                self.usage.failures += 1
                raise BackendError(f"request rejected (400): {_short(error)}") from error
            except openai.OpenAIError as error:
                self.usage.failures += 1
                raise BackendError(_describe(error)) from error
        raise AssertionError("unreachable: tenacity returns or raises")

    async def _create(self, messages: ChatMessages, max_tokens: int, temperature: float, json_mode: bool) -> str:
        """One request; in JSON mode unless the server is known not to do it (then remembered and asked again)."""
        use_json = json_mode and self.supports_json_mode is not False
        extra = {"response_format": {"type": "json_object"}} if use_json else {}
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=temperature,
                **extra,  # type: ignore[arg-type]
            )
        except openai.BadRequestError as error:
            if not (use_json and "response_format" in str(error)):
                raise
            logger.info("%s rejects response_format; continuing without JSON mode", self.base_url)
            self.supports_json_mode = False
            return await self._create(messages, max_tokens, temperature, json_mode)
        return self._account(response, use_json)

    def _before_retry(self, state: RetryCallState) -> None:
        self.usage.retries += 1
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.debug("retry %d in %.2fs after %s", state.attempt_number, delay, _describe(error or Exception()))

    def _account(self, response: object, used_json: bool) -> str:
        self.usage.requests += 1
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.usage.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.usage.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
        if used_json:
            self.supports_json_mode = True
        choices = getattr(response, "choices", None) or []
        if not choices or choices[0].message is None:
            raise BackendError("the server answered without a choice")
        return choices[0].message.content or ""

    def _delay(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: the server's ``Retry-After`` (capped), else exponential with jitter."""
        error = state.outcome.exception() if state.outcome else None
        retry_after = _retry_after_s(error) if error is not None else None
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        exponential = min(self.backoff_s * 2 ** (state.attempt_number - 1), self.max_backoff_s)
        return exponential * (0.5 + self._jitter.random() / 2)  # jitter spreads synchronized retries

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.close()


def _retry_after_s(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    kind = type(error).__name__
    return f"{kind} ({status}): {_short(error)}" if status else f"{kind}: {_short(error)}"


def _short(error: Exception, limit: int = 200) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
