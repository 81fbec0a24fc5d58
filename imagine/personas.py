"""Personas: who the imagined user is. Drawn by an LLM (step 1 of the pipeline) or sampled from the hints.

A task's ``persona_hints`` read like ``"budget (tight, moderate, generous)"``: a dimension and its values.
:func:`sample_persona` draws one value per dimension, which needs no model at all, covers the space evenly
and is what small local models use; capable LLMs invent richer personas (:func:`personas_from_llm_reply`).
Either way :class:`PersonaPool` hands out personas without duplicates.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from imagine.parsing import DialogueParseError, extract_json
from imagine.task import TaskSpec, hint_values

Persona = dict[str, Any]

FIRST_NAMES = (
    "Ada", "Ben", "Chen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Imani", "Jonas", "Kira", "Luis", "Mei", "Nadia",
    "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoe",
)  # fmt: skip


@dataclass(frozen=True)
class Dimension:
    """One way users differ, with its listed values (empty when the hint lists none)."""

    name: str
    values: tuple[str, ...]


def dimensions(task: TaskSpec) -> list[Dimension]:
    """The task's persona hints split into dimension names and value lists."""
    return [Dimension(name, values) for name, values in hint_values(task.persona_hints).items()]


def sample_persona(task: TaskSpec, rng: random.Random) -> Persona:
    """One value per listed dimension, a first name, and a one-line description."""
    attributes = {d.name: rng.choice(d.values) for d in dimensions(task) if d.values}
    name = rng.choice(FIRST_NAMES)
    description = f"{name} is {task.user_role.split(';')[0].split(' who ')[0]}. " + "; ".join(
        f"{key}: {value}" for key, value in attributes.items()
    )
    return {"name": name, "attributes": attributes, "description": description, "origin": "hints"}


def persona_key(persona: Persona) -> str:
    """What makes two personas the same: their attribute values, else their description."""
    attributes = persona.get("attributes") or {}
    if attributes:
        return "|".join(f"{_norm(k)}={_norm(v)}" for k, v in sorted(attributes.items(), key=lambda kv: _norm(kv[0])))
    return _norm(persona.get("description", ""))


def _norm(value: object) -> str:
    return " ".join(re.sub(r"[^\w ]", " ", str(value).lower()).split())


def personas_from_llm_reply(text: str) -> list[Persona]:
    """Personas from a step-1 reply: a JSON object with a ``personas`` list (or a bare list); junk skipped."""
    data = extract_json(text)
    items = data.get("personas", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise DialogueParseError("bad_personas", "no 'personas' list")
    personas = []
    for item in items:
        if not isinstance(item, dict):
            continue
        attributes = item.get("attributes") if isinstance(item.get("attributes"), dict) else {}
        attributes = {str(k): str(v) for k, v in attributes.items() if str(v).strip()}
        description = str(item.get("description") or "").strip()
        if not attributes and not description:
            continue
        persona = {"name": str(item.get("name") or "").strip(), "attributes": attributes}
        personas.append({**persona, "description": description, "origin": "llm"})
    return personas


class PersonaPool:
    """Hands out distinct personas: from an LLM in batches when ``ask_llm`` is given, else from the hints.

    Refills run concurrently, as many as the callers waiting need (one request brings ``batch_size``), so
    a run with many dialogues in flight never queues behind one persona request. When the LLM fails or
    repeats itself the pool falls back to sampling (counted in ``fallbacks``); when even sampling finds
    nothing new (the hint space is small) it repeats a persona (``repeats``).
    """

    def __init__(
        self,
        task: TaskSpec,
        *,
        seed: int,
        ask_llm: Callable[[int, list[str]], Awaitable[str]] | None = None,
        batch_size: int = 8,
        seen: set[str] | None = None,
    ) -> None:
        self.task = task
        self.ask_llm = ask_llm
        self.batch_size = batch_size
        self.seen: set[str] = set(seen or ())
        self.fallbacks = 0
        self.repeats = 0
        self.llm_errors = 0
        self._rng = random.Random(f"personas:{seed}")
        self._ready: list[Persona] = []
        self._descriptions: list[str] = []
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._refills = 0
        self._finished = 0
        self._last_refill_added = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def next(self) -> Persona:
        """A persona not handed out before (as far as the space allows)."""
        if self.ask_llm is None:
            return self._sample_new()
        async with self._changed:
            self._waiting += 1
            try:
                while not self._ready:
                    if self._refills * self.batch_size < self._waiting:
                        self._refills += 1
                        task = asyncio.create_task(self._refill())
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    finished = self._finished
                    await self._changed.wait_for(lambda seen=finished: bool(self._ready) or self._finished != seen)
                    if not self._ready and not self._last_refill_added:
                        self.fallbacks += 1  # the LLM gave nothing new: don't wait on it again for this one
                        return self._sample_new()
                return self._ready.pop(0)
            finally:
                self._waiting -= 1

    async def _refill(self) -> None:
        try:
            reply = await self.ask_llm(self.batch_size, list(self._descriptions))  # type: ignore[misc]
            candidates = personas_from_llm_reply(reply)
        except Exception:  # a failed or unparsable reply: callers fall back to sampling from the hints
            self.llm_errors += 1
            candidates = []
        async with self._changed:
            added = 0
            for persona in candidates:
                key = persona_key(persona)
                if key and key not in self.seen:
                    self.seen.add(key)
                    self._ready.append(persona)
                    self._descriptions.append(persona.get("description") or key)
                    added += 1
            self._last_refill_added = added
            self._refills -= 1
            self._finished += 1
            self._changed.notify_all()

    def _sample_new(self) -> Persona:
        persona = sample_persona(self.task, self._rng)
        for _ in range(50):
            key = persona_key(persona)
            if key not in self.seen:
                self.seen.add(key)
                return persona
            persona = sample_persona(self.task, self._rng)
        self.repeats += 1
        return persona
