"""``reverie imagine``: imagine dialogues for a task and store them (resumable by run id)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bot.context import configure_logging, open_store
from bot.settings import Settings
from imagine.backends import BackendError, ChatBackend, make_backend
from imagine.engine import ImaginationEngine, ImagineConfig, ImagineEvent, ImagineReport
from imagine.task import TaskSpec, TaskSpecError, load_task
from storage import Conversation, Platform, Source, Store

console = Console(stderr=True)
BACKENDS = ("openai", "local", "scripted")
#: What ``--backend`` accepts: a backend, or ``auto`` (resolved by :func:`bot.imagination.choose_imagination`).
CHOICES = ("auto", *BACKENDS)


def build_backend(
    settings: Settings,
    kind: str,
    *,
    concurrency: int,
    seed: int,
    threads: int | None = None,
    base_model: str | None = None,
) -> ChatBackend:
    """The configured LLM backend: an OpenAI-compatible server, or the base model on this machine.

    ``base_model`` overrides ``settings.base_model`` for the local backend; ``concurrency`` is the server's
    request limit or the local model's batch size.
    """
    if kind == "openai":
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return make_backend(
            "openai",
            model=settings.openai_model,
            base_url=settings.openai_base_url,
            api_key=key,
            concurrency=concurrency,
            timeout_s=settings.openai_timeout_s,
            max_retries=settings.openai_max_retries,
            seed=seed,
        )
    if kind == "local":
        from learning.base_model import load_base_model

        loaded = load_base_model(base_model or settings.base_model, cache_dir=settings.resolved_model_cache_dir)
        return make_backend(
            "local",
            model=(loaded.model, loaded.tokenizer),
            model_name=loaded.model_id,
            max_batch=concurrency,
            seed=seed,
            num_threads=threads,
        )
    raise BackendError(f"unknown backend {kind!r}: choose one of {', '.join(BACKENDS)}")


async def imagine_dialogues(
    settings: Settings,
    store: Store,
    task: TaskSpec,
    n: int,
    *,
    backend: str,
    critique: bool = True,
    concurrency: int | None = None,
    seed: int = 0,
    run_id: str | None = None,
    on_event: Any = None,
    threads: int | None = None,
    on_start: Any = None,
) -> ImagineReport:
    """Imagine until ``run_id`` has ``n`` dialogues of ``task`` in ``store``; the improvement loop calls this too."""
    if backend == "scripted":
        return await _scripted(store, task, n, seed=seed, run_id=run_id or f"{task.name}-scripted-seed{seed}")
    concurrency = concurrency or (settings.openai_concurrency if backend == "openai" else 16)
    chat = build_backend(settings, backend, concurrency=concurrency, seed=seed, threads=threads)
    try:
        config = ImagineConfig(critique=critique, concurrency=concurrency, seed=seed, run_id=run_id)
        engine = ImaginationEngine(task, chat, store=store, config=config)
        return await engine.run(n, on_event=on_event, on_start=on_start)
    finally:
        await chat.aclose()


async def _scripted(store: Store, task: TaskSpec, n: int, *, seed: int, run_id: str) -> ImagineReport:
    """Dialogues of scripted behaviour agents with the simulated users of the task's compiled world (no model)."""
    try:
        from imagine.simulated import SCRIPTED_REWARD_SOURCE, generate_scripted_dialogues
    except ImportError as error:
        raise BackendError(f"the scripted backend is not available in this build: {error}") from error
    started = time.perf_counter()
    report = ImagineReport(run_id=run_id, task=task.name, requested=n)
    async with store.database.session() as session:
        from sqlmodel import select

        metas = (await session.exec(select(Conversation.meta).where(Conversation.task == task.name))).all()
    done = {m.get("index") for m in metas if isinstance(m, dict) and m.get("run_id") == run_id}
    report.already_done = len(done)
    try:
        records = generate_scripted_dialogues(task, n, seed)
    except (KeyError, ValueError) as error:
        raise BackendError(f"task {task.name!r} has no world of simulated users: {error}") from error
    for index, record in enumerate(records):
        if index in done:
            continue
        meta = {**record.meta, "backend": "scripted", "model": "scripted", "run_id": run_id, "index": index}
        await store.save_dialogue(
            source=Source.IMAGINED,
            platform=Platform.IMAGINED,
            task=task.name,
            turns=[(t.role, t.text) for t in record.turns],
            reward=record.reward,
            reward_source=SCRIPTED_REWARD_SOURCE,
            persona=record.persona,
            meta=meta,
        )
        report.accepted += 1
        report.attempts += 1
    report.elapsed_s = time.perf_counter() - started
    return report


def _summary(report: ImagineReport, backend: str) -> Table:
    table = Table(title=f"reverie imagine: {report.task} ({backend}), run {report.run_id}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("stored in this run", str(report.accepted))
    if report.already_done:
        table.add_row("stored by earlier runs with this id", str(report.already_done))
    table.add_row("total / requested", f"{report.total} / {report.requested}")
    table.add_row("attempts", str(report.attempts))
    for reason, count in report.rejected.most_common():
        table.add_row(f"rejected: {reason}", str(count))
    if report.persona_fallbacks:
        table.add_row("personas sampled from hints (LLM gave none)", str(report.persona_fallbacks))
    for name in ("requests", "prompt_tokens", "completion_tokens", "retries", "failures"):
        if report.usage.get(name):
            table.add_row(name.replace("_", " "), str(report.usage[name]))
    rate = report.accepted / report.elapsed_s * 60 if report.elapsed_s > 0 else 0.0
    table.add_row("time", f"{report.elapsed_s:.1f} s ({rate:.1f} dialogues/min)")
    return table


def register(app: typer.Typer) -> None:
    """Add ``imagine`` to the CLI."""

    @app.command("imagine")
    def imagine(
        task: str = typer.Option(None, "--task", help="Built-in task name or a task .toml file (default: TASK)."),
        n: int = typer.Option(200, "--n", min=1, help="How many dialogues this run should have."),
        backend: str = typer.Option(
            None,
            "--backend",
            help="auto | openai | local | scripted (default: IMAGINE_BACKEND; auto: scripted, the task's compiled "
            "world, when its hints list values, else an LLM server if configured, else local).",
            show_default=False,
        ),
        no_critique: bool = typer.Option(False, "--no-critique", help="Skip the critique-and-revise step."),
        concurrency: int = typer.Option(
            None, "--concurrency", min=1, help="Dialogues in flight (default: OPENAI_CONCURRENCY, or 16 locally)."
        ),
        seed: int = typer.Option(None, "--seed", help="Random seed; with no --run-id, also names the run."),
        run_id: str = typer.Option(
            None, "--run-id", help="Resume this run: dialogues it already stored count towards --n."
        ),
        threads: int = typer.Option(
            None, "--threads", min=1, help="CPU threads for the local model (default: torch's choice)."
        ),
    ) -> None:
        """Imagine goal-directed dialogues (personas → reward-conditioned dialogue → critique) into the database."""
        settings = Settings()
        configure_logging(settings.log_level)
        kind = backend or settings.imagine_backend
        if kind not in CHOICES:
            console.print(f"[red]--backend must be one of {', '.join(CHOICES)}, not {kind!r}[/red]")
            raise typer.Exit(code=2)
        try:
            spec = load_task(task or settings.task)
        except TaskSpecError as error:
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(code=2) from error
        if kind == "auto":
            from bot.imagination import choose_imagination

            choice = choose_imagination(settings.model_copy(update={"imagine_backend": "auto"}), spec)
            kind = choice.backend
            console.print(f"imagining with {choice.describe()}")
        if run_id is None:
            # An explicit seed names the run, so the same command resumes; otherwise every run is fresh.
            run_id = f"{spec.name}-seed{seed}" if seed is not None else f"{spec.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        seed = seed if seed is not None else random.randrange(2**31)
        report = asyncio.run(_run(settings, spec, n, kind, not no_critique, concurrency, seed, run_id, threads))
        console.print(_summary(report, kind))
        if report.stopped_early:
            console.print(f"[yellow]stopped early: {report.stopped_early}[/yellow]")
        if report.total < n:
            console.print(f"[yellow]resume with: reverie imagine --task {task or settings.task} --n {n} "
                          f"--backend {kind} --seed {seed} --run-id {report.run_id}[/yellow]")  # fmt: skip
        if report.total == 0:
            raise typer.Exit(code=1)  # a short run still exits 0: what it stored is usable and kept


async def _run(
    settings: Settings,
    task: TaskSpec,
    n: int,
    backend: str,
    critique: bool,
    concurrency: int | None,
    seed: int,
    run_id: str,
    threads: int | None,
) -> ImagineReport:
    rejects: Counter[str] = Counter()
    accepted = 0
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("[yellow]{task.fields[rejects]}"),
    )
    async with open_store(settings) as store:
        with Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task(f"imagining {task.name}", total=n, rate="", rejects="")
            started = time.perf_counter()

            def on_event(event: ImagineEvent) -> None:
                nonlocal accepted
                if event.accepted:
                    accepted += 1
                    progress.advance(bar)
                else:
                    rejects[event.reason] += 1
                minutes = max(time.perf_counter() - started, 1e-6) / 60
                top = ", ".join(f"{r} {c}" for r, c in rejects.most_common(2))
                rejected = sum(rejects.values())
                progress.update(
                    bar,
                    rate=f"{accepted / minutes:.1f}/min",
                    rejects=f"rejected {rejected} ({top})" if rejected else "",
                )

            try:
                report = await imagine_dialogues(
                    settings,
                    store,
                    task,
                    n,
                    backend=backend,
                    critique=critique,
                    concurrency=concurrency,
                    seed=seed,
                    run_id=run_id,
                    on_event=on_event,
                    threads=threads,
                    on_start=lambda done: progress.reset(bar, total=n, completed=done),
                )
            except BackendError as error:
                console.print(f"[red]{error}[/red]")
                raise typer.Exit(code=1) from error
            progress.update(bar, completed=report.total)
    return report
