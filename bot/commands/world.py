"""``reverie world check|enrich``: see and improve the world a task compiles into (``imagine.world``)."""

from __future__ import annotations

import asyncio
import random

import typer
from rich.console import Console
from rich.table import Table

from bot.settings import Settings

console = Console()

world_app = typer.Typer(help="The world a task compiles into: simulated users, scripted agents, the act's judge.")


def _load(task: str | None, settings: Settings):
    from imagine.task import TaskSpecError, load_task

    try:
        return load_task(task or settings.task)
    except TaskSpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(code=2) from error


@world_app.command("check")
def check(
    task: str = typer.Option(None, "--task", help="Built-in task name or a task .toml file (default: TASK)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample conversation shown."),
) -> None:
    """Compile the task's world, show what it is made of and one conversation of the careful agent; exit 2 with
    the lines to fix when it does not compile."""
    from imagine.simulated import play_scripted_episode
    from imagine.world import TaskWorldError, world_for

    spec = _load(task, Settings())
    try:
        world = world_for(spec)
    except TaskWorldError as error:
        console.print("[red]the world does not compile:[/red]")
        for problem in str(error).split(" | "):
            console.print(f"  - {problem}")
        raise typer.Exit(code=2) from error
    table = Table(
        title=f"{spec.name}: {world.persona_space} value combinations, {len(world.side_questions)} side questions"
    )
    for column in ("dimension", "role", "values", "phrasings per value", "questions"):
        table.add_column(column)
    for attribute in world.attributes:
        table.add_row(
            attribute.name,
            attribute.role,
            ", ".join(attribute.value_names),
            str(min(len(v.says) for v in attribute.values)) if attribute.role == "preference" else "",
            str(len(attribute.questions)) if attribute.role == "preference" else "",
        )
    console.print(table)
    persona = world.sample_persona(random.Random(seed))
    turns, _, outcome = play_scripted_episode(spec, "careful", persona, seed=seed, phrasings="all")
    console.print(f"a careful agent with {world.describe_persona(persona)}: {outcome}")
    for turn in turns:
        console.print(f"  [bold]{turn.role}[/bold]: {turn.text}")


@world_app.command("enrich")
def enrich(
    task: str = typer.Option(None, "--task", help="A task .toml file (default: TASK)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing <task>.world.toml."),
) -> None:
    """Ask the configured OpenAI-compatible server how users say each value and what fits or clashes with it; every
    line is checked, and the rest is written to <task>.world.toml beside the task file for you to review."""
    from bot.commands.imagine import build_backend
    from bot.imagination import llm_server_configured
    from imagine.task import world_file
    from imagine.world.enrich import enrich_world, write_world_file

    settings = Settings()
    spec = _load(task, settings)
    if not llm_server_configured(settings):
        console.print("[red]no LLM server configured: set OPENAI_BASE_URL (and OPENAI_API_KEY) first[/red]")
        raise typer.Exit(code=2)
    if spec.reference == spec.name:
        console.print("[red]give the task as a .toml file: the details are written beside it[/red]")
        raise typer.Exit(code=2)
    if world_file(spec.reference).exists() and not force:
        console.print(f"[red]{world_file(spec.reference)} exists: edit it, or use --force to replace it[/red]")
        raise typer.Exit(code=2)

    async def run():
        backend = build_backend(settings, "openai", concurrency=settings.openai_concurrency, seed=0)
        try:
            return await enrich_world(spec, backend)
        finally:
            await backend.aclose()

    report = asyncio.run(run())
    path = write_world_file(spec.reference, report.attributes, force=force)
    says = sum(len(v.says) for a in report.attributes for v in a.values)
    console.print(f"wrote {path}: {len(report.attributes)} dimensions, {says} user replies")
    for dimension, reason in report.failed.items():
        console.print(f"[yellow]{dimension}: the server's answer was unusable ({reason}); its names are used[/yellow]")
    for line in report.dropped:
        console.print(f"[yellow]dropped: {line}[/yellow]")
    console.print("review it, then `reverie world check` shows the world")


def register(app: typer.Typer) -> None:
    """Add ``world`` to the CLI."""
    app.add_typer(world_app, name="world")
