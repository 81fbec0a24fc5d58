"""The one small interface every LLM backend implements, and the usage it accounts for."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

ChatMessages = list[dict[str, str]]


class BackendError(RuntimeError):
    """A backend could not produce a completion (after its retries); the message says why."""


@dataclass
class Usage:
    """What a backend has spent so far: requests, tokens, retries and failures."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """A JSON-ready copy, with the total."""
        return {**asdict(self), "total_tokens": self.total_tokens}


@runtime_checkable
class ChatBackend(Protocol):
    """An async chat model: messages in (OpenAI format, roles system/user/assistant), text out.

    Implementations are safe to call concurrently; they bound their own concurrency (HTTP) or batch
    concurrent calls into one forward pass (local models).
    """

    #: Backend kind, e.g. ``"openai"`` or ``"local"``: stored with every imagined dialogue.
    name: str
    #: The model that answers, e.g. ``"gpt-4o-mini"`` or a model directory: stored with every dialogue.
    model: str
    #: Whether the model can write a whole coherent dialogue in one completion (big models) or the engine
    #: must generate it turn by turn with role prompts (small local models).
    writes_whole_dialogues: bool
    usage: Usage

    async def complete(
        self,
        messages: ChatMessages,
        *,
        max_tokens: int = 256,
        temperature: float = 0.8,
        json_mode: bool = False,
    ) -> str:
        """The assistant's reply to ``messages``; ``json_mode`` asks for a JSON object where supported.

        Raises :class:`BackendError` when no reply could be had.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, threads and models."""
        ...
