"""Evaluate policies against simulated users with hidden personas.

Every policy meets the SAME personas (drawn from ``seed``) and users with the same paraphrase seeds, so
differences come from the policies. Episodes run in lockstep: one ``policy.respond_batch`` call per agent
turn across all open episodes, which makes a 200-episode evaluation a handful of batched generations.
Evaluation episodes can be stored with source ``"evaluation"`` and platform ``"sim"`` (never ``"real"``).
:func:`learning.report.write_report` turns an :class:`EvaluationReport` into ``report.md`` + ``report.png``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from imagine.simulated import (
    LLM_REWARD_SOURCE,
    SCRIPTED_REWARD_SOURCE,
    ChatCompleter,
    LLMUser,
    SimulatedUser,
    stable_rng,
)
from imagine.task import TaskSpec
from imagine.world import Split, TaskWorldError, world_for
from learning.cpus import follow_cpu_affinity
from learning.interface import Message, Policy
from storage import Store
from storage.rewards import is_success

logger = logging.getLogger(__name__)

UserKind = Literal["scripted", "llm"]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a success rate (95 % by default); ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Exact bounds at the extremes (floating point would leave them a hair inside).
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return (low, high)


@dataclass(slots=True)
class EpisodeResult:
    """One evaluation episode of one policy."""

    index: int
    persona: dict[str, Any]
    persona_type: str
    turns: list[tuple[str, str]]
    reward: float
    outcome: str
    conversation_id: int | None = None
    #: Whether the agent asked for a value the user had already given (simulated users of a compiled world).
    re_asked: bool = False

    @property
    def success(self) -> bool:
        """A reward that counts as success (``storage.rewards.is_success``; scripted rewards are 0/1)."""
        return is_success(self.reward)

    @property
    def agent_turns(self) -> int:
        """How many times the agent spoke."""
        return sum(1 for role, _ in self.turns if role == "agent")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (turns as ``[role, text]`` pairs)."""
        return {
            "index": self.index,
            "persona": self.persona,
            "persona_type": self.persona_type,
            "turns": [list(turn) for turn in self.turns],
            "reward": self.reward,
            "outcome": self.outcome,
            "conversation_id": self.conversation_id,
            "re_asked": self.re_asked,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpisodeResult:
        """The inverse of :meth:`to_dict`."""
        return cls(
            index=int(data["index"]),
            persona=dict(data["persona"]),
            persona_type=str(data["persona_type"]),
            turns=[(str(role), str(text)) for role, text in data["turns"]],
            reward=float(data["reward"]),
            outcome=str(data["outcome"]),
            conversation_id=data.get("conversation_id"),
            re_asked=bool(data.get("re_asked", False)),
        )


@dataclass(slots=True)
class PolicyResult:
    """All episodes of one policy, with the summary statistics reports and promotion gates use."""

    name: str
    version_id: int | None
    episodes: list[EpisodeResult] = field(default_factory=list)
    seconds: float = 0.0
    #: Set when the policy raised: its unfinished episodes scored 0 with outcome ``"policy_error"``.
    error: str | None = None

    @property
    def n(self) -> int:
        """Number of episodes."""
        return len(self.episodes)

    @property
    def successes(self) -> int:
        """Number of successful episodes."""
        return sum(1 for episode in self.episodes if episode.success)

    @property
    def success_rate(self) -> float:
        """Fraction of successful episodes."""
        return self.successes / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """95 % Wilson interval of the success rate."""
        return wilson_interval(self.successes, self.n)

    @property
    def mean_reward(self) -> float:
        """Mean terminal reward."""
        return sum(e.reward for e in self.episodes) / self.n if self.n else 0.0

    @property
    def re_ask_rate(self) -> float:
        """Share of episodes in which the agent asked for a value the user had already given."""
        return sum(1 for e in self.episodes if e.re_asked) / self.n if self.n else 0.0

    @property
    def mean_turns(self) -> float:
        """Mean number of agent turns per episode."""
        return sum(e.agent_turns for e in self.episodes) / self.n if self.n else 0.0

    def by_persona_type(self) -> dict[str, tuple[int, int]]:
        """persona type → (successes, episodes), sorted by type."""
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for episode in self.episodes:
            counts[episode.persona_type][0] += int(episode.success)
            counts[episode.persona_type][1] += 1
        return {key: (value[0], value[1]) for key, value in sorted(counts.items())}

    def outcomes(self) -> dict[str, int]:
        """How episodes ended (``fit``, ``misfit``, ``turn_limit``, ``judged_success`` …) → count."""
        counts: dict[str, int] = defaultdict(int)
        for episode in self.episodes:
            counts[episode.outcome] += 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        """JSON-ready metrics, e.g. for ``PolicyVersion.metrics``."""
        low, high = self.interval
        return {
            "name": self.name,
            "version_id": self.version_id,
            "episodes": self.n,
            "success_rate": self.success_rate,
            "ci_low": low,
            "ci_high": high,
            "mean_reward": self.mean_reward,
            "mean_turns": self.mean_turns,
            "re_ask_rate": self.re_ask_rate,
            "by_persona_type": {k: {"successes": s, "episodes": n} for k, (s, n) in self.by_persona_type().items()},
            "outcomes": self.outcomes(),
            "seconds": self.seconds,
            "error": self.error,
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` and every episode: what :meth:`from_dict` restores the result from."""
        return {**self.summary(), "episodes_detail": [episode.to_dict() for episode in self.episodes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyResult:
        """The inverse of :meth:`to_dict` (the summary's statistics are recomputed from the episodes)."""
        return cls(
            name=str(data["name"]),
            version_id=data.get("version_id"),
            episodes=[EpisodeResult.from_dict(episode) for episode in data["episodes_detail"]],
            seconds=float(data.get("seconds", 0.0)),
            error=data.get("error"),
        )


def paired_difference(candidate: PolicyResult, baseline: PolicyResult, z: float = 1.96) -> tuple[float, float, float]:
    """(mean reward difference candidate − baseline, 95 % CI low, high) over the shared personas.

    Both results must come from the same :func:`evaluate` call (episode ``i`` is persona ``i`` for both), so
    the per-episode differences are paired, which gives a tighter interval than comparing two rates.
    """
    if [e.index for e in candidate.episodes] != [e.index for e in baseline.episodes]:
        raise ValueError("paired comparison needs results over the same episodes (one evaluate() call)")
    differences = [a.reward - b.reward for a, b in zip(candidate.episodes, baseline.episodes, strict=True)]
    n = len(differences)
    if n == 0:
        return (0.0, -1.0, 1.0)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(variance / n)
    return (mean, mean - half, mean + half)


@dataclass(slots=True)
class EvaluationReport:
    """The results of :func:`evaluate`: one :class:`PolicyResult` per policy, same personas for all."""

    task: str
    users: str
    seed: int
    episodes: int
    results: list[PolicyResult]
    started_at: datetime
    finished_at: datetime
    #: Which personas and phrasings were met: ``"heldout"`` (value combinations and phrasings never trained on),
    #: ``"train"`` or ``"all"``; see :mod:`imagine.world.splits`.
    split: str = "all"

    def result(self, name: str) -> PolicyResult:
        """The result of the policy called ``name``."""
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no policy {name!r} in this report: {[r.name for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: per policy its summary statistics and every episode (``episodes_detail``)."""
        return {
            "task": self.task,
            "users": self.users,
            "seed": self.seed,
            "episodes": self.episodes,
            "split": self.split,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "policies": [result.to_dict() for result in self.results],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON (``report.json``); :meth:`from_json` reads it back."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """The inverse of :meth:`to_dict`; ``ValueError`` when ``data`` is not a report."""
        try:
            return cls(
                task=str(data["task"]),
                users=str(data["users"]),
                seed=int(data["seed"]),
                episodes=int(data["episodes"]),
                results=[PolicyResult.from_dict(result) for result in data["policies"]],
                started_at=datetime.fromisoformat(data["started_at"]),
                finished_at=datetime.fromisoformat(data["finished_at"]),
                split=str(data.get("split", "all")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not an evaluation report: {type(error).__name__}: {error}") from error

    @classmethod
    def from_json(cls, text: str) -> EvaluationReport:
        """A report from :meth:`to_json`'s text; ``ValueError`` when it is not one."""
        return cls.from_dict(json.loads(text))


async def evaluation_personas(
    task: TaskSpec, episodes: int, seed: int, backend: ChatCompleter | None = None, split: Split = "heldout"
) -> list[dict[str, Any]]:
    """The hidden personas an evaluation uses, the same for every policy.

    They come from the task's compiled world, from ``split``'s value combinations. A task without a world (its
    hints list no values) needs ``backend`` (LLM users), which invents one concrete persona per episode along the
    persona hints.
    """
    try:
        return [dict(p) for p in world_for(task).sample_personas(episodes, seed, split)]
    except TaskWorldError:
        if backend is None:
            raise
    return list(await asyncio.gather(*(_invent_persona(task, backend, seed, index) for index in range(episodes))))


async def _invent_persona(task: TaskSpec, backend: ChatCompleter, seed: int, index: int) -> dict[str, Any]:
    # The episode number and seed in the prompt make parallel requests differ even at equal temperature.
    rng = stable_rng("llm-persona", task.name, seed, index)
    hints = "\n".join(f"- {hint}" for hint in rng.sample(task.persona_hints, k=len(task.persona_hints)))
    prompt = (
        f"Invent user #{index} (seed {seed}) for this situation: {task.user_role}.\n"
        f"Choose one concrete value for each of these traits:\n{hints}\n"
        'Answer with one JSON object only, trait name → value, e.g. {"budget": "tight"}.'
    )
    text = await backend.complete([{"role": "user", "content": prompt}], max_tokens=160, temperature=1.0)
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match:
        try:
            data = json.loads(match.group(0))
            if isinstance(data, dict) and data:
                return {str(key): value for key, value in data.items()}
        except ValueError:
            pass
    return {"description": text.strip()[:500] or "an ordinary user"}


def _persona_type(task: TaskSpec, persona: Mapping[str, Any]) -> str:
    return str(next(iter(persona.values()), "unknown"))


def _make_users(
    task: TaskSpec,
    personas: Sequence[Mapping[str, Any]],
    users: UserKind,
    seed: int,
    backend: ChatCompleter | None,
    judge: ChatCompleter | None,
    split: Split,
) -> list[SimulatedUser]:
    if users == "scripted":
        world = world_for(task)
        return [
            world.make_user(persona, seed=("eval", seed, index), max_turns=task.max_turns, phrasings=split)
            for index, persona in enumerate(personas)
        ]
    if backend is None:
        raise ValueError("users='llm' needs backend=<a chat backend> (and optionally judge=)")
    return [
        LLMUser(backend, task, persona, persona_type=_persona_type(task, persona), judge=judge) for persona in personas
    ]


async def evaluate_async(
    policies: Sequence[Policy],
    task: TaskSpec,
    *,
    users: UserKind = "scripted",
    episodes: int = 200,
    seed: int = 0,
    store: Store | None = None,
    progress: bool = True,
    backend: ChatCompleter | None = None,
    judge: ChatCompleter | None = None,
    batch_size: int = 64,
    max_turns: int | None = None,
    split: Split = "heldout",
) -> EvaluationReport:
    """Run every policy for ``episodes`` episodes against the same simulated users; see :func:`evaluate`."""
    if users not in ("scripted", "llm"):
        raise ValueError(f"users must be 'scripted' or 'llm', not {users!r}")
    if users == "scripted":
        world_for(task)  # a task whose world does not compile fails here, with the reason
    if users == "llm" and backend is None:
        raise ValueError("users='llm' needs backend=<a chat backend> (and optionally judge=)")
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    if not policies:
        raise ValueError("give at least one policy")
    limit = max_turns or task.max_turns
    personas = await evaluation_personas(task, episodes, seed, backend if users == "llm" else None, split)
    started = datetime.now(UTC)
    results: list[PolicyResult] = []
    with _progress(progress) as bar:
        for policy in policies:
            bar_task = bar.add_task(policy.name, total=episodes)
            user_list = _make_users(task, personas, users, seed, backend, judge, split)
            result = await _run_policy(
                policy, task, personas, user_list, seed, limit, batch_size, lambda k, t=bar_task: bar.advance(t, k)
            )
            results.append(result)
            if store is not None:
                await _store_episodes(store, task, result, users, seed)
    return EvaluationReport(
        task=task.name,
        users=users,
        seed=seed,
        episodes=episodes,
        results=results,
        started_at=started,
        finished_at=datetime.now(UTC),
        split=split,
    )


def evaluate(
    policies: Sequence[Policy],
    task: TaskSpec,
    *,
    users: UserKind = "scripted",
    episodes: int = 200,
    seed: int = 0,
    store: Store | None = None,
    progress: bool = True,
    backend: ChatCompleter | None = None,
    judge: ChatCompleter | None = None,
    batch_size: int = 64,
    max_turns: int | None = None,
    split: Split = "heldout",
) -> EvaluationReport:
    """Evaluate ``policies`` on ``task`` against simulated users with hidden personas (blocking).

    ``users="scripted"`` uses the users of the task's compiled world (objective 0/1 reward, any task), meeting
    ``split``'s personas and phrasings (default: the held-out ones, never trained on);
    ``users="llm"`` uses :class:`imagine.simulated.LLMUser` on ``backend``, scored by ``judge`` (default: the
    same backend). Every policy meets the same ``episodes`` personas drawn from ``seed``. Agent turns are
    generated with ``policy.respond_batch`` in chunks of ``batch_size`` open episodes, in lockstep; an
    episode ends when the user ends it or after ``max_turns`` agent turns (default: the task's).
    With ``store``, each episode is saved (source ``"evaluation"``, platform ``"sim"``). Call from
    synchronous code; inside an event loop use ``await evaluate_async(...)`` (same arguments).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(
            evaluate_async(
                policies,
                task,
                users=users,
                episodes=episodes,
                seed=seed,
                store=store,
                progress=progress,
                backend=backend,
                judge=judge,
                batch_size=batch_size,
                max_turns=max_turns,
                split=split,
            )
        )
    raise RuntimeError("evaluate() blocks; inside an event loop use `await evaluate_async(...)`")


class _Episode:
    __slots__ = ("history", "index", "outcome", "user")

    def __init__(self, index: int, user: SimulatedUser) -> None:
        self.index = index
        self.user = user
        self.history: list[Message] = []
        self.outcome: str | None = None


def opening_history(task: TaskSpec) -> list[Message]:
    """How every conversation starts, in evaluation as in serving and training: the task's opening line,
    said by the agent before the user speaks (the bot sends it; training treats it as context, not action)."""
    return [Message("agent", task.opening_line)]


async def _run_policy(
    policy: Policy,
    task: TaskSpec,
    personas: Sequence[Mapping[str, Any]],
    users: Sequence[SimulatedUser],
    seed: int,
    max_turns: int,
    batch_size: int,
    advance: Any,
) -> PolicyResult:
    clock = time.perf_counter()
    episodes = [_Episode(index, user) for index, user in enumerate(users)]
    result = PolicyResult(name=policy.name, version_id=policy.version_id)
    # The opening line is the agent's first turn (it counts towards max_turns, as in the imagined data);
    # the policy is first asked for a reply after the user has answered it.
    opening = opening_history(task)[0].text
    openings = await asyncio.gather(*(e.user.reply(opening) for e in episodes), return_exceptions=True)
    open_episodes = _record_turn(episodes, [opening] * len(episodes), openings, advance)
    for turn in range(1, max_turns):
        if not open_episodes:
            break
        try:
            replies = await _respond_in_chunks(
                policy, [e.history for e in open_episodes], seed * 1000 + turn, batch_size
            )
        except Exception as error:  # a broken policy must not take the other policies' evaluation down
            logger.exception("policy %s failed at turn %d", policy.name, turn)
            result.error = f"{type(error).__name__}: {error}"
            for episode in open_episodes:
                episode.outcome = "policy_error"
            advance(len(open_episodes))
            open_episodes = []
            break
        answers = await asyncio.gather(
            *(e.user.reply(text) for e, text in zip(open_episodes, replies, strict=True)), return_exceptions=True
        )
        open_episodes = _record_turn(open_episodes, replies, answers, advance)
    advance(len(open_episodes))
    for episode in open_episodes:
        episode.outcome = "turn_limit"
    scores = await asyncio.gather(*(e.user.score() for e in episodes), return_exceptions=True)
    for episode, score in zip(episodes, scores, strict=True):
        reward = 0.0 if isinstance(score, BaseException) or episode.outcome in ("policy_error", "user_error") else score
        outcome = episode.outcome or getattr(episode.user, "outcome", None) or "ended"
        if isinstance(score, BaseException):
            logger.warning("scoring failed in episode %d: %s", episode.index, score)
            outcome = "score_error"
        result.episodes.append(
            EpisodeResult(
                index=episode.index,
                persona=dict(personas[episode.index]),
                persona_type=episode.user.persona_type,
                turns=[(m.role, m.text) for m in episode.history],
                reward=float(reward),
                outcome=str(outcome),
                re_asked=bool(getattr(episode.user, "re_asked", False)),
            )
        )
    result.seconds = time.perf_counter() - clock
    return result


def _record_turn(
    episodes: Sequence[_Episode], agent_texts: Sequence[str], answers: Sequence[Any], advance: Any
) -> list[_Episode]:
    """Append each agent utterance and the user's answer (or mark a failed user); returns the episodes still open."""
    still_open = []
    for episode, text, answer in zip(episodes, agent_texts, answers, strict=True):
        episode.history.append(Message("agent", text))
        if isinstance(answer, BaseException):
            logger.warning("simulated user failed in episode %d: %s", episode.index, answer)
            episode.outcome = "user_error"
            advance(1)
            continue
        episode.history.append(Message("user", answer.text))
        if answer.done:
            advance(1)
        else:
            still_open.append(episode)
    return still_open


def _respond_following_cpus(policy: Policy, histories: Sequence[Sequence[Message]], seed: int) -> list[str]:
    follow_cpu_affinity()  # in the thread that decodes: thread pools are sized per thread
    return policy.respond_batch(histories, seed=seed)


async def _respond_in_chunks(
    policy: Policy, histories: Sequence[Sequence[Message]], seed: int, batch_size: int
) -> list[str]:
    replies: list[str] = []
    for start in range(0, len(histories), max(1, batch_size)):
        chunk = histories[start : start + max(1, batch_size)]
        # respond_batch blocks (model inference): keep the event loop free for LLM users and the bot.
        chunk_replies = await asyncio.to_thread(_respond_following_cpus, policy, chunk, seed + start)
        if len(chunk_replies) != len(chunk):
            raise RuntimeError(f"respond_batch returned {len(chunk_replies)} replies for {len(chunk)} histories")
        replies.extend(str(reply) for reply in chunk_replies)
    return replies


async def _store_episodes(store: Store, task: TaskSpec, result: PolicyResult, users: str, seed: int) -> None:
    reward_source = SCRIPTED_REWARD_SOURCE if users == "scripted" else LLM_REWARD_SOURCE
    version_id = await _known_version(store, result.version_id)
    for episode in result.episodes:
        if not episode.turns:
            continue
        meta = {
            "evaluation": True,
            "policy": result.name,
            "users": users,
            "seed": seed,
            "episode": episode.index,
            "outcome": episode.outcome,
        }
        conversation = await store.save_dialogue(
            source="evaluation",
            platform="sim",
            task=task.name,
            turns=episode.turns,
            reward=episode.reward,
            reward_source=reward_source,
            persona=episode.persona,
            meta=meta if result.version_id is None else {**meta, "policy_version_id": result.version_id},
            policy_version_id=version_id,
        )
        episode.conversation_id = conversation.id


async def _known_version(store: Store, version_id: int | None) -> int | None:
    # A policy loaded from a checkpoint that this database never registered must not break storing.
    if version_id is None or await store.get_policy_version(version_id) is None:
        return None
    return version_id


class _RateColumn(ProgressColumn):
    """Episodes per second, averaged over the elapsed time: lockstep episodes finish in bursts, so rich's
    windowed ``task.speed`` would report absurd rates."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time or task.elapsed
        if not elapsed or not task.completed:
            return Text("? ep/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:.2f} ep/s", style="progress.data.speed")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


__all__ = [
    "EpisodeResult",
    "EvaluationReport",
    "PolicyResult",
    "evaluate",
    "evaluate_async",
    "evaluation_personas",
    "opening_history",
    "paired_difference",
    "wilson_interval",
]
