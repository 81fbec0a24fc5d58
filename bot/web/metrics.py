"""Prometheus metrics of a serving process (prometheus-client), one registry per :class:`BotMetrics`.

Counted as they happen: messages, commands and button presses handled (by platform), reply latency (a histogram
per platform), errors by kind (apologies sent, and ERROR log records by the component that logged them).
Read from the database and the policy holder at each scrape (:meth:`BotMetrics.refresh`): the active policy
version, improvement runs by outcome and the last gate's paired difference — so every replica reports the same,
shared, values for those.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func
from sqlmodel import select

from bot.events import ChatRef, Reply
from bot.service import DialogueService
from storage import utcnow

if TYPE_CHECKING:
    from bot.policy_holder import PolicyHolder
    from storage import Store

#: Reply latency buckets in seconds: a CPU policy answers in about 0.2–3 s, an overloaded one in tens.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
#: Improvement-run outcomes always exported (0 until one happens), so dashboards see every series.
RUN_OUTCOMES = ("running", "succeeded", "rejected", "failed", "cancelled")


@dataclass
class RunSteps:
    """When each step of one improvement run began (in this process)."""

    steps: list[tuple[str, datetime]] = field(default_factory=list)

    def durations(self, finished_at: datetime | None) -> list[tuple[str, float | None]]:
        """``(step, seconds)``, each step lasting until the next began; the last until ``finished_at`` (None while
        it runs)."""
        ends: list[datetime | None] = [start for _, start in self.steps[1:]]
        ends.append(finished_at)
        return [
            (name, None if end is None else max(0.0, (end - start).total_seconds()))
            for (name, start), end in zip(self.steps, ends, strict=True)
        ]


class StepTimer:
    """Times the steps of improvement runs: an observer for ``ImprovementLoop.on_step`` (imagine, select, train,
    evaluate, gate), kept in memory for the last few runs; closed steps go to :attr:`BotMetrics.step_seconds`."""

    #: The step every run begins with.
    FIRST_STEP = "imagine"

    def __init__(self, gauge: Gauge, keep: int = 10) -> None:
        self._gauge = gauge
        self._keep = keep
        self.runs: list[RunSteps] = []

    def __call__(self, step: str) -> None:
        """Step ``step`` of the current run begins now (``imagine`` begins a new run)."""
        now = utcnow()
        if step == self.FIRST_STEP or not self.runs:
            self.runs = [*self.runs[-(self._keep - 1) :], RunSteps()]
        current = self.runs[-1]
        if current.steps:
            name, start = current.steps[-1]
            self._gauge.labels(name).set((now - start).total_seconds())
        current.steps.append((step, now))

    def for_run(self, started_at: datetime | None) -> RunSteps | None:
        """The steps of the run that started at ``started_at`` (the first timed run beginning after it)."""
        if started_at is None:
            return None
        candidates = [run for run in self.runs if run.steps and run.steps[0][1] >= started_at]
        return min(candidates, key=lambda run: run.steps[0][1], default=None)


class BotMetrics:
    """The metrics one serving process exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.handled = Counter(
            "reverie_handled",
            "Messages, commands and button presses handled, by platform and kind.",
            ["platform", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "reverie_reply_latency_seconds",
            "Time from a user's message to the service's reply (policy included), by platform.",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "reverie_errors", "Errors by kind (apology sent, or the component that logged an error).", ["kind"],
            registry=self.registry,
        )  # fmt: skip
        self.active_version = Gauge(
            "reverie_active_policy_version", "Version id of the policy serving now (0: the prompted base model).",
            registry=self.registry,
        )  # fmt: skip
        self.runs = Gauge(
            "reverie_improvement_runs", "Improvement runs in the database, by outcome.", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.gate_difference = Gauge(
            "reverie_last_gate_difference",
            "Candidate − active success (paired, over the same personas) at the last gated run; NaN before one.",
            registry=self.registry,
        )
        self.gate_difference.set(float("nan"))
        self.step_seconds = Gauge(
            "reverie_improvement_step_seconds",
            "How long each step of the last improvement run this process ran took (imagine ... evaluate).",
            ["step"],
            registry=self.registry,
        )
        #: Step timings of improvement runs (attach with :meth:`observe_improver`).
        self.steps = StepTimer(self.step_seconds)
        for outcome in RUN_OUTCOMES:
            self.runs.labels(outcome)

    def observe_reply(self, platform: str, kind: str, seconds: float, replies: list[Reply]) -> None:
        """Count one handled message/command and its latency; an error reply counts as an apology."""
        self.handled.labels(platform, kind).inc()
        if kind == "message":
            self.latency.labels(platform).observe(seconds)
        for reply in replies:
            if reply.is_error:
                self.errors.labels(f"{kind}_refused_or_apology").inc()
                break

    async def refresh(self, store: Store, policies: PolicyHolder) -> None:
        """Read the shared values (active version, runs by outcome, last gate difference) for a scrape."""
        from storage import TrainingRun

        self.active_version.set(policies.version_id or 0)
        async with store.database.session() as session:
            counts = dict(
                (await session.exec(select(TrainingRun.status, func.count()).group_by(TrainingRun.status))).all()
            )
        for outcome in {*RUN_OUTCOMES, *counts}:
            self.runs.labels(outcome).set(counts.get(outcome, 0))
        for run in await _recent_finished_runs(store):
            difference = (run.metrics or {}).get("paired_difference")
            if difference is not None:
                self.gate_difference.set(float(difference))
                break

    def observe_improver(self, improver: object) -> None:
        """Time the steps of an improvement loop that reports them (``on_step``), keeping its own observer."""
        previous = getattr(improver, "on_step", None)
        if not callable(previous):
            return

        def on_step(step: str) -> None:
            self.steps(step)
            previous(step)

        improver.on_step = on_step  # type: ignore[attr-defined]

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


async def _recent_finished_runs(store: Store, limit: int = 20) -> list:  # type: ignore[type-arg]
    from storage import TrainingRun

    async with store.database.session() as session:
        query = (
            select(TrainingRun)
            .where(TrainingRun.finished_at.is_not(None))  # type: ignore[union-attr]
            .order_by(TrainingRun.id.desc())  # type: ignore[union-attr]
            .limit(limit)
        )
        return list((await session.exec(query)).all())


class ErrorLogCounter(logging.Handler):
    """Counts ERROR (and worse) log records in :attr:`BotMetrics.errors`, labelled by the logging component
    (the logger name's first two parts, e.g. ``bot.service``, ``bot.adapters``)."""

    def __init__(self, metrics: BotMetrics) -> None:
        super().__init__(level=logging.ERROR)
        self._metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        """Count the record (never formats it: nothing of its text, secrets included, reaches a label)."""
        self._metrics.errors.labels("log:" + ".".join(record.name.split(".")[:2])).inc()


class MeteredDialogueService(DialogueService):
    """A :class:`DialogueService` that counts what it handles and times its replies in :class:`BotMetrics`."""

    def __init__(self, *, metrics: BotMetrics, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.metrics = metrics

    async def handle_message(self, chat: ChatRef, text: str) -> list[Reply]:
        """:meth:`DialogueService.handle_message`, counted and timed."""
        started = time.perf_counter()
        replies = await super().handle_message(chat, text)
        self.metrics.observe_reply(chat.platform, "message", time.perf_counter() - started, replies)
        return replies

    async def handle_command(self, chat: ChatRef, name: str, argument: str = "") -> list[Reply]:
        """:meth:`DialogueService.handle_command`, counted."""
        started = time.perf_counter()
        replies = await super().handle_command(chat, name, argument)
        self.metrics.observe_reply(chat.platform, "command", time.perf_counter() - started, replies)
        return replies

    async def handle_feedback(self, chat: ChatRef, data: str) -> str:
        """:meth:`DialogueService.handle_feedback`, counted."""
        toast = await super().handle_feedback(chat, data)
        self.metrics.handled.labels(chat.platform, "feedback").inc()
        return toast
