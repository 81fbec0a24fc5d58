"""The imagination engine: personas → reward-conditioned dialogues → critique and revision → storage.

Two ways to write a dialogue, chosen by what the backend can do:

* ``whole``: a capable LLM writes the whole dialogue in one completion (the paper's setting); a second
  completion critiques it against the task's criteria and returns a revision.
* ``turns``: a small local model cannot keep a whole dialogue coherent, so it plays one side at a time with
  role prompts that carry the outcome (an agent that asks before acting, or one that guesses early; a user
  who is pleased or disappointed). The critique there is a rule check per turn that regenerates offending
  turns (empty, echoed, repeated, wrong final sentiment).

Every dialogue is stored as soon as it is accepted, tagged with the run id, so an interrupted run keeps its
work and a re-run with the same run id continues up to ``n``. Nothing a model writes can crash the batch:
each failure is counted under a reason and the engine moves on (until ``max_attempts``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlmodel import col, select

from imagine import prompts
from imagine.backends import BackendError, ChatBackend
from imagine.parsing import (
    AGENT,
    USER,
    DialogueParseError,
    ParsedDialogue,
    extract_json,
    fingerprint,
    parse_dialogue,
    single_turn,
)
from imagine.personas import Persona, PersonaPool, dimensions, persona_key
from imagine.task import TaskSpec
from storage import Conversation, Platform, Source, Store

logger = logging.getLogger(__name__)

Mode = Literal["auto", "whole", "turns"]
REWARD_SOURCE = "imagined"

# A small lexicon is enough to check a one-sentence reaction from a small model.
_POSITIVE = (
    "thank", "great", "perfect", "love", "sounds good", "makes sense", "wonderful", "awesome", "excellent",
    "helpful", "exactly", "happy", "amazing", "nice", "fantastic", "i'll take", "let's do", "clear",
)  # fmt: skip
_NEGATIVE = (
    "disappoint", "not for me", "don't like", "do not like", "not really", "boring", "confus", "unhappy",
    "no thanks", "hate", "wrong", "not what", "doesn't fit", "does not fit", "too expensive", "not interested",
    "don't understand", "lost me", "not sure", "unfortunately", "i'm not", "too much", "doesn't help",
)  # fmt: skip


# Whole words only: 'whatever' must not count as 'hate'.
_POSITIVE_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in _POSITIVE) + r")", re.IGNORECASE)
_NEGATIVE_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in _NEGATIVE) + r")", re.IGNORECASE)
# A small model asked to play the user often slips back into being the helpful assistant.
_ASSISTANT_SPEAK = re.compile(
    r"\b(?:how can i (?:help|assist)|happy to help|i can help you|let me help|assist you|welcome to my|"
    r"as an ai|i'd be happy to|your travel agent|i'm your)\b",
    re.IGNORECASE,
)


@dataclass
class ImagineConfig:
    """How a run imagines; the defaults suit both backends."""

    critique: bool = True
    concurrency: int = 16
    seed: int = 0
    run_id: str | None = None
    success_rate: float = 0.5
    mode: Mode = "auto"
    #: Give up after this many attempts per requested dialogue (rejections cost attempts).
    max_attempts_per_dialogue: float = 3.0
    #: Stop early when this many backend errors happened and nothing was accepted (a dead server).
    max_errors_before_first_success: int = 10
    dialogue_max_tokens: int = 800
    turn_max_tokens: int = 40
    turn_retries: int = 2
    personas_per_request: int = 8


@dataclass
class ImaginedDialogue:
    """One accepted dialogue, as stored."""

    turns: tuple[tuple[str, str], ...]
    reward: float
    persona: Persona
    meta: dict[str, Any]
    conversation_id: int | None = None


@dataclass
class ImagineEvent:
    """Progress: one attempt finished, accepted or rejected (with its reason)."""

    accepted: bool
    reason: str = ""
    dialogue: ImaginedDialogue | None = None


@dataclass
class ImagineReport:
    """What a run did."""

    run_id: str
    task: str
    requested: int
    already_done: int = 0
    accepted: int = 0
    attempts: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dialogues: list[ImaginedDialogue] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    stopped_early: str | None = None
    persona_fallbacks: int = 0

    @property
    def total(self) -> int:
        """Dialogues of this run in storage now (earlier runs with the same id included)."""
        return self.already_done + self.accepted


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ImaginationEngine:
    """Imagines dialogues for one task with one backend, storing them in ``store`` when given."""

    def __init__(
        self,
        task: TaskSpec,
        backend: ChatBackend,
        *,
        store: Store | None = None,
        config: ImagineConfig | None = None,
    ) -> None:
        self.task = task
        self.backend = backend
        self.store = store
        self.config = config or ImagineConfig()
        if self.config.mode == "auto":
            self.mode: Literal["whole", "turns"] = "whole" if backend.writes_whole_dialogues else "turns"
        else:
            self.mode = self.config.mode
        self.run_id = self.config.run_id or f"{task.name}-seed{self.config.seed}"
        self._labels = (*task.user_aliases, *task.agent_aliases)

    # --- the run ---------------------------------------------------------------------------------------

    async def run(
        self,
        n: int,
        *,
        on_event: Callable[[ImagineEvent], None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> ImagineReport:
        """Imagine until this run id has ``n`` dialogues (or attempts run out); never raises for bad output.

        ``on_start`` hears how many dialogues earlier runs with this id stored; ``on_event`` hears every attempt.
        """
        started = time.perf_counter()
        report = ImagineReport(run_id=self.run_id, task=self.task.name, requested=n)
        done_indices, seen_personas, seen_fingerprints = await self._existing()
        report.already_done = len(done_indices)
        if on_start is not None:
            on_start(report.already_done)
        remaining = n - report.already_done
        if remaining <= 0:
            report.elapsed_s = time.perf_counter() - started
            return report
        pool = PersonaPool(
            self.task,
            seed=self.config.seed,
            ask_llm=self._ask_personas if self.mode == "whole" else None,
            batch_size=self.config.personas_per_request,
            seen=seen_personas,
        )
        max_attempts = max(1, int(remaining * self.config.max_attempts_per_dialogue))
        next_index = max(done_indices, default=-1) + 1
        backend_errors = 0

        def record(event: ImagineEvent) -> None:
            nonlocal backend_errors
            if event.accepted and event.dialogue is not None:
                report.accepted += 1
                report.dialogues.append(event.dialogue)
            else:
                report.rejected[event.reason] += 1
                if event.reason.startswith("backend_error"):
                    backend_errors += 1
                    if report.accepted == 0 and backend_errors >= self.config.max_errors_before_first_success:
                        report.stopped_early = f"the backend keeps failing: {event.reason}"
            if on_event is not None:
                on_event(event)

        # At most `concurrency` attempts in flight, and never more than could still be needed: a rejection
        # re-opens a slot. One event loop owns the counters, so no lock.
        in_flight: set[asyncio.Task[ImagineEvent]] = set()
        async with asyncio.TaskGroup() as group:
            while report.accepted < remaining and not report.stopped_early:
                room = min(self.config.concurrency, remaining - report.accepted) - len(in_flight)
                if room > 0 and report.attempts < max_attempts:
                    in_flight.add(group.create_task(self._attempt(next_index, pool, seen_fingerprints)))
                    next_index += 1
                    report.attempts += 1
                    continue
                if not in_flight:
                    report.stopped_early = f"gave up after {report.attempts} attempts (too many rejections)"
                    break
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    record(task.result())
            for task in asyncio.as_completed(in_flight):  # stopped early: attempts under way still count
                record(await task)
        report.usage = self.backend.usage.as_dict()
        report.persona_fallbacks = pool.fallbacks
        report.elapsed_s = time.perf_counter() - started
        return report

    async def _attempt(self, index: int, pool: PersonaPool, seen_fingerprints: set[str]) -> ImagineEvent:
        rng = random.Random(f"{self.run_id}:{self.config.seed}:{index}")
        reward = 1 if rng.random() < self.config.success_rate else 0
        try:
            persona = await pool.next()
            if self.mode == "whole":
                parsed, critique = await self._whole_dialogue(persona, reward)
            else:
                parsed, critique = await self._turn_by_turn(persona, reward, rng)
            key = fingerprint(parsed.turns)
            if key in seen_fingerprints:
                raise _Rejected("duplicate")
            seen_fingerprints.add(key)
            judged = self._world_reward(persona, parsed.turns)
            dialogue = ImaginedDialogue(
                turns=parsed.turns,
                reward=float(reward if judged is None else judged),
                persona=persona,
                meta={
                    "backend": self.backend.name,
                    "model": self.backend.model,
                    "run_id": self.run_id,
                    "index": index,
                    "seed": self.config.seed,
                    "mode": self.mode,
                    "critique": critique,
                    "repairs": list(parsed.repairs),
                    "fingerprint": key,
                    "persona_key": persona_key(persona),
                    "prompt_version": prompts.PROMPT_VERSION,
                    # the reward the dialogue was written for, and who scored the one stored
                    "intended_reward": reward,
                    "judge": "world" if judged is not None else "outcome",
                },
            )
            if self.store is not None:
                conversation = await self.store.save_dialogue(
                    source=Source.IMAGINED,
                    platform=Platform.IMAGINED,
                    task=self.task.name,
                    turns=parsed.turns,
                    reward=dialogue.reward,
                    reward_source=REWARD_SOURCE,
                    persona=persona,
                    meta=dialogue.meta,
                )
                dialogue.conversation_id = conversation.id
            return ImagineEvent(accepted=True, dialogue=dialogue)
        except DialogueParseError as error:
            return ImagineEvent(accepted=False, reason=error.reason)
        except _Rejected as error:
            return ImagineEvent(accepted=False, reason=error.reason)
        except BackendError as error:
            logger.debug("dialogue %d: backend error: %s", index, error)
            return ImagineEvent(accepted=False, reason="backend_error")
        except Exception as error:  # never let one dialogue take the batch down
            logger.exception("dialogue %d failed", index)
            return ImagineEvent(accepted=False, reason=f"error:{type(error).__name__}")

    def _world_reward(self, persona: Persona, turns: Sequence[tuple[str, str]]) -> float | None:
        """The reward the task's compiled world gives the dialogue's last final act (0 when the agent never acts),
        so LLM-imagined dialogues are scored by the same judge as the world's own; ``None`` when the task has no
        world or the persona does not name a value for every preference."""
        from imagine.world import TaskWorldError, world_for

        try:
            world = world_for(self.task)
        except TaskWorldError:
            return None
        attributes = persona.get("attributes") or {}
        values = {a.name: attributes.get(a.name) for a in world.preferences}
        if any(value not in world.attribute(name).value_names for name, value in values.items()):
            return None
        for role, text in reversed(turns):
            if role == AGENT and (act := world.final_act(text)) is not None:
                return 1.0 if world.act_fits(values, act) else 0.0
        return 0.0

    async def _existing(self) -> tuple[set[int], set[str], set[str]]:
        """Indices, persona keys and fingerprints of this run's dialogues already stored (for resuming)."""
        if self.store is None:
            return set(), set(), set()
        async with self.store.database.session() as session:
            rows = await session.exec(
                select(Conversation.meta).where(
                    Conversation.source == Source.IMAGINED,
                    Conversation.task == self.task.name,
                    col(Conversation.id).is_not(None),
                )
            )
            metas = [m for m in rows.all() if isinstance(m, dict) and m.get("run_id") == self.run_id]
        indices = {int(m["index"]) for m in metas if isinstance(m.get("index"), int)}
        personas = {str(m["persona_key"]) for m in metas if m.get("persona_key")}
        fingerprints = {str(m["fingerprint"]) for m in metas if m.get("fingerprint")}
        return indices, personas, fingerprints

    # --- whole dialogues (capable LLMs) ---------------------------------------------------------------

    async def _ask_personas(self, count: int, avoid: list[str]) -> str:
        return await self.backend.complete(
            prompts.persona_messages(self.task, count, avoid), max_tokens=1500, temperature=1.0, json_mode=True
        )

    def _parse(self, text: str) -> ParsedDialogue:
        return parse_dialogue(
            text,
            user_labels=self.task.user_aliases,
            agent_labels=self.task.agent_aliases,
            opening_line=self.task.opening_line,
            # LLMs overshoot the turn limit a little; beyond that the dialogue ignored the brief.
            max_agent_turns=self.task.max_turns + 2,
        )

    async def _whole_dialogue(self, persona: Persona, reward: int) -> tuple[ParsedDialogue, str]:
        text = await self.backend.complete(
            prompts.dialogue_messages(self.task, persona, reward),
            max_tokens=self.config.dialogue_max_tokens,
            temperature=0.9,
        )
        parsed = self._parse(text)
        if not self.config.critique:
            return parsed, "skipped"
        reply = await self.backend.complete(
            prompts.critique_messages(self.task, persona, reward, prompts.format_dialogue(parsed.turns)),
            max_tokens=self.config.dialogue_max_tokens + 300,
            temperature=0.3,
            json_mode=True,
        )
        revised_text = _revised_dialogue_text(reply)
        if revised_text is None:
            return parsed, "unusable"  # the critique said nothing we can use: keep the draft, which parsed
        try:
            revised = self._parse(revised_text)
        except DialogueParseError:
            return parsed, "unusable"
        if fingerprint(revised.turns) == fingerprint(parsed.turns):
            return parsed, "passed"
        return revised, "revised"

    # --- turn by turn (small local models) ------------------------------------------------------------

    async def _turn_by_turn(self, persona: Persona, reward: int, rng: random.Random) -> tuple[ParsedDialogue, str]:
        plan = self._plan(reward, rng)
        turns: list[tuple[str, str]] = [(AGENT, self.task.opening_line)]
        repairs: list[str] = []
        for step, instruction in enumerate(plan):
            final = step == len(plan) - 1
            user_instruction = (
                self._reaction_instruction(reward)
                if final
                else "Answer only the agent's question, briefly; do not volunteer anything else."
            )
            turns.append(await self._turn(USER, persona, turns, user_instruction, reward if final else None, repairs))
            if final:
                break
            turns.append(await self._turn(AGENT, persona, turns, instruction, None, repairs))
        critique = "skipped" if not self.config.critique else ("revised" if repairs else "passed")
        return ParsedDialogue(turns=tuple(turns), repairs=tuple(repairs)), critique

    def _plan(self, reward: int, rng: random.Random) -> list[str]:
        """The agent's instruction for each of its turns after the opening line; the last one acts."""
        dims = [d.name for d in dimensions(self.task)] or ["what they want"]
        rng.shuffle(dims)
        room = max(0, self.task.max_turns - 2)  # opening line and the act take two agent turns
        act = self.task.act_instruction or f"Now act on what you learned: {self.task.agent_goal}"
        if reward:
            questions = rng.randint(min(2, room, len(dims)), min(room, len(dims), 3))
        else:
            questions = rng.randint(0, min(1, room))
            act = f"{act} Do not ask anything more; just guess."
        asks = [f"Ask one short question about the user's {dim}." for dim in dims[:questions]]
        return [*asks, act, "(the user reacts)"]

    def _reaction_instruction(self, reward: int) -> str:
        if reward:
            return "The agent's last suggestion fits you well: say you are pleased and thank them."
        return "The agent's last suggestion does not fit you: say you are disappointed and why."

    async def _turn(
        self,
        role: str,
        persona: Persona,
        turns: list[tuple[str, str]],
        instruction: str,
        reward: int | None,
        repairs: list[str],
    ) -> tuple[str, str]:
        """One turn, regenerated while it breaks a rule (the critique-and-revise of turn mode)."""
        if role == AGENT:
            messages = prompts.agent_turn_messages(self.task, turns, instruction)
        else:
            messages = prompts.user_turn_messages(self.task, persona, turns, instruction)
        tries = 1 + (self.config.turn_retries if self.config.critique else 0)
        problem = "empty_turn"
        for attempt in range(tries):
            raw = await self.backend.complete(messages, max_tokens=self.config.turn_max_tokens, temperature=0.8)
            text = single_turn(raw, labels=self._labels)
            if self.config.critique:
                problem = self._turn_problem(role, text, turns, reward)
            else:
                problem = "" if text else "empty_turn"
            if not problem:
                if attempt:
                    repairs.append(f"regenerated_{role}_turn")
                return role, text
        raise DialogueParseError(problem, f"{role} turn {len(turns)}")

    def _turn_problem(self, role: str, text: str, turns: list[tuple[str, str]], reward: int | None) -> str:
        if len(text) < 2:
            return "empty_turn"
        if role == USER and _ASSISTANT_SPEAK.search(text):
            return "role_confusion"
        normalized = _comparable(text)
        if any(_comparable(previous) == normalized for _, previous in turns):
            return "repeated_turn"
        if reward is not None and not _sentiment_matches(text, reward):
            return "sentiment_mismatch"
        return ""


def _comparable(text: str) -> str:
    """Lower case words and numbers only: two turns that say the same thing compare equal."""
    return " ".join(re.sub(r"[^\w ]", " ", text.lower()).split())


def _sentiment_matches(text: str, reward: int) -> bool:
    """Whether a final user turn sounds pleased (reward 1) or not (reward 0), by a small lexicon."""
    lowered = text.lower().replace("’", "'")
    positive = _POSITIVE_RE.search(lowered) is not None
    negative = _NEGATIVE_RE.search(lowered) is not None
    return (positive and not negative) if reward else (negative or not positive)


def _revised_dialogue_text(reply: str) -> str | None:
    """The revision inside a critique reply: JSON ``revised`` (text or list of turns), or a labelled dialogue."""
    try:
        data = extract_json(reply)
    except DialogueParseError:
        return reply if reply.strip() else None  # maybe the model just wrote the revised dialogue
    if not isinstance(data, dict):
        return None
    revised = data.get("revised") or data.get("revised_dialogue") or data.get("dialogue")
    if isinstance(revised, str):
        return revised
    if isinstance(revised, list):  # [{"speaker": "Agent", "text": "..."}] or ["Agent: ...", ...]
        lines = []
        for item in revised:
            if isinstance(item, dict):
                speaker = item.get("speaker") or item.get("role") or ""
                lines.append(f"{speaker}: {item.get('text') or item.get('content') or ''}")
            elif isinstance(item, str):
                lines.append(item)
        return "\n".join(lines)
    return None
