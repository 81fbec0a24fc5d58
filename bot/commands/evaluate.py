"""``reverie eval``: evaluate policies against simulated users and write a report (Markdown + PNG)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from bot.commands import console
from bot.settings import Settings
from learning.devices import resolve_device

if TYPE_CHECKING:
    from imagine.task import TaskSpec
    from learning.evaluation import EvaluationReport
    from learning.interface import Policy

SCRIPTED_PREFIX = "scripted:"
LOCAL_USER_BATCH = 32  # LLM users on the local base model: replies generated together


def load_policies(
    sources: list[str], task: TaskSpec, *, base_model: str, cache_dir: Path | None, device: str
) -> list[Policy]:
    """Policies by source: ``base``, a checkpoint directory, or ``scripted:<behaviour>`` (a scripted agent).

    ``device`` may be ``auto`` (CUDA when available); torch is imported only for learned policies.
    """
    from imagine.simulated import BEHAVIOURS, BehaviourPolicy

    policies: list[Any] = []
    try:
        for source in sources:
            if source.startswith(SCRIPTED_PREFIX):
                behaviour = source.removeprefix(SCRIPTED_PREFIX)
                if behaviour not in BEHAVIOURS:
                    raise typer.BadParameter(
                        f"unknown scripted behaviour {behaviour!r}: choose from {', '.join(BEHAVIOURS)}",
                        param_hint="--policy",
                    )
                policies.append(BehaviourPolicy(task, behaviour))
                continue
            try:
                from learning.policy import load_policy
            except ImportError as error:
                raise typer.BadParameter(
                    f"cannot load {source!r}: learned policies are unavailable ({error})", param_hint="--policy"
                ) from error
            if source != "base" and not Path(source).is_dir():
                raise typer.BadParameter(
                    f"{source!r} is neither 'base' nor a checkpoint directory", param_hint="--policy"
                )
            policies.append(
                load_policy(
                    source, task=task, base_model=base_model, cache_dir=cache_dir, device=resolve_device(device)
                )
            )
    except BaseException:
        for policy in policies:
            policy.close()
        raise
    return policies


def make_user_backend(settings: Settings, kind: str, base_model: str, seed: int) -> Any:
    """The chat backend LLM users (and their judge) run on: ``openai`` (settings) or ``local`` (the base model).

    ``scripted`` (a valid imagination backend without a chat model) means the local base model here.
    """
    from bot.commands.imagine import build_backend

    kind = "local" if kind == "scripted" else kind
    concurrency = settings.openai_concurrency if kind == "openai" else LOCAL_USER_BATCH
    return build_backend(settings, kind, concurrency=concurrency, seed=seed, base_model=base_model)


def summary_table(report: EvaluationReport) -> Table:
    """A rich table of the headline numbers."""
    table = Table(title=f"{report.task}: {report.episodes} episodes, {report.users} users, seed {report.seed}")
    for column in ("policy", "success", "95 % CI", "mean reward", "mean turns", "time"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for result in report.results:
        low, high = result.interval
        table.add_row(
            result.name,
            f"{100 * result.success_rate:.1f} %",
            f"{100 * low:.1f}–{100 * high:.1f} %",
            f"{result.mean_reward:.3f}",
            f"{result.mean_turns:.2f}",
            f"{result.seconds:.1f} s",
        )
    return table


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the CLI."""

    @app.command("eval")
    def evaluate_command(
        task_name: str = typer.Option(None, "--task", help="Built-in task name or TOML path (default: settings)."),
        policy_sources: list[str] = typer.Option(
            ["base"],
            "--policy",
            help="'base', a checkpoint directory, or 'scripted:<careful|eager|sloppy|chatty>'; repeat to compare.",
        ),
        users: str = typer.Option(
            "scripted", "--users", help="'scripted' (the task's world: objective reward) or 'llm' (LLM + judge)."
        ),
        split: str = typer.Option(
            "heldout",
            "--split",
            help="Simulated users' personas and phrasings: 'heldout' (never trained on), 'train' or 'all'.",
        ),
        episodes: int = typer.Option(200, "--episodes", min=1, help="Episodes per policy (same personas for all)."),
        seed: int = typer.Option(0, "--seed", help="Seed for personas, users and sampling."),
        out: Path | None = typer.Option(None, "--out", help="Report directory (default: DATA_DIR/reports/eval-…)."),
        base_model: str | None = typer.Option(
            None, "--base-model", help="smollm2, tiny or a path (default: settings)."
        ),
        user_backend: str | None = typer.Option(
            None,
            "--user-backend",
            help="LLM users' backend: openai or local (default: IMAGINE_BACKEND if it names one, else openai "
            "where a server is configured, else local).",
        ),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Episodes per respond_batch call."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda or auto (default: settings)."),
        store: bool = typer.Option(True, "--store/--no-store", help="Save episodes (source=evaluation, platform=sim)."),
        job: Path | None = typer.Option(
            None,
            "--job",
            help="A job file (bot.jobs.EvalJob, as the improvement loop writes it): its task, named policies, users, "
            "episodes, seed, base model and store replace those options; --out still says where the report goes.",
        ),
    ) -> None:
        """Evaluate policies against simulated users with hidden personas; write report.md and report.png."""
        from imagine.task import TaskSpecError, load_task

        names: list[str] | None = None
        if job is not None:
            from bot.jobs import EvalJob, JobError

            try:
                loaded = EvalJob.from_json(job)
            except JobError as error:
                raise typer.BadParameter(str(error), param_hint="--job") from error
            task_name, users, episodes, seed, split = (
                loaded.task,
                loaded.users,
                loaded.episodes,
                loaded.seed,
                loaded.split,
            )
            base_model, store = loaded.base_model, loaded.store
            names, policy_sources = list(loaded.policies), list(loaded.policies.values())
        if users not in ("scripted", "llm"):
            raise typer.BadParameter("choose 'scripted' or 'llm'", param_hint="--users")
        if split not in ("heldout", "train", "all"):
            raise typer.BadParameter("choose 'heldout', 'train' or 'all'", param_hint="--split")
        settings = Settings()
        try:
            task = load_task(task_name or settings.task)
        except TaskSpecError as error:
            raise typer.BadParameter(str(error), param_hint="--task") from error
        if users == "scripted":
            from bot.imagination import world_problem

            if (problem := world_problem(task)) is not None:
                raise typer.BadParameter(f"{problem}; fix the task file or use --users llm", param_hint="--users")
        model_name = base_model or settings.base_model
        out_dir = out or settings.data_dir / "reports" / f"eval-{task.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        policies = load_policies(
            policy_sources,
            task,
            base_model=model_name,
            cache_dir=settings.resolved_model_cache_dir,
            device=device or settings.device,
        )
        if names is not None:
            for policy, name in zip(policies, names, strict=True):
                policy.name = name  # the job's names, by which the improvement loop finds each result
        try:
            report = asyncio.run(
                _run(
                    settings, policies, task, users, episodes, seed, store, user_backend, model_name, batch_size, split
                )
            )
        finally:
            for policy in policies:
                policy.close()
        from learning.report import write_report

        files = write_report(report, out_dir)
        console.print(summary_table(report))
        console.print(f"report: {files.markdown}\nplot:   {files.plot}")


async def _run(
    settings: Settings,
    policies: list[Policy],
    task: TaskSpec,
    users: str,
    episodes: int,
    seed: int,
    store: bool,
    user_backend: str | None,
    base_model: str,
    batch_size: int,
    split: str,
) -> EvaluationReport:
    from bot.context import open_store
    from bot.imagination import chat_backend
    from learning.evaluation import evaluate_async

    kind = user_backend or chat_backend(settings)
    backend = make_user_backend(settings, kind, base_model, seed) if users == "llm" else None
    try:
        options: dict[str, Any] = {
            "users": users,
            "episodes": episodes,
            "seed": seed,
            "progress": True,
            "backend": backend,
            "batch_size": batch_size,
            "split": split,
        }
        if not store:
            return await evaluate_async(policies, task, **options)
        if settings.resolved_database_url.startswith("sqlite:///"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with open_store(settings) as opened:
            return await evaluate_async(policies, task, store=opened, **options)
    finally:
        if backend is not None:
            await backend.aclose()
