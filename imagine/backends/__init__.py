"""LLM backends behind one small async chat interface (:class:`ChatBackend`).

``make_backend("openai", base_url=..., model=...)`` talks to any OpenAI-compatible server;
``make_backend("local", model=path_or_(model, tokenizer))`` runs a transformers model here.
"""

from __future__ import annotations

from typing import Any

from imagine.backends.base import BackendError, ChatBackend, ChatMessages, Usage

BACKEND_KINDS = ("openai", "local")


def make_backend(kind: str, **options: Any) -> ChatBackend:
    """Build a backend by kind; ``options`` go to its constructor (:class:`OpenAIBackend`, :class:`LocalBackend`)."""
    if kind == "openai":
        from imagine.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(**options)
    if kind == "local":
        if "model" not in options:
            raise BackendError("the local backend needs model=<model directory> or model=(model, tokenizer)")
        from imagine.backends.local import LocalBackend  # imports torch and transformers: only when asked for

        return LocalBackend(options.pop("model"), **options)
    raise BackendError(f"unknown backend {kind!r}: choose one of {', '.join(BACKEND_KINDS)}")


__all__ = ["BACKEND_KINDS", "BackendError", "ChatBackend", "ChatMessages", "Usage", "make_backend"]
