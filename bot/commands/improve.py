"""``reverie improve``: one improvement run from the command line."""

from __future__ import annotations

import asyncio
import signal

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bot.commands import console
from bot.context import configure_logging, open_store
from bot.improve import ImprovementBusyError, ImprovementLoop
from bot.settings import Settings
from imagine.task import load_task

STEPS = ("imagine", "select", "train", "evaluate", "gate")


def register(app: typer.Typer) -> None:
    """Add ``improve`` to the CLI."""

    @app.command("improve")
    def improve(
        now: bool = typer.Option(False, "--now", help="Run one improvement run now (required)."),
        steps: int | None = typer.Option(None, help="Optimizer steps (default IMPROVE_STEPS)."),
        imagined: int | None = typer.Option(None, help="Fresh imagined dialogues (default IMPROVE_IMAGINED)."),
        episodes: int | None = typer.Option(None, help="Evaluation episodes (default IMPROVE_EVAL_EPISODES)."),
    ) -> None:
        """Imagine → select real dialogues → train → evaluate → promote if not worse. Runs in the foreground."""
        if not now:
            console.print("Nothing to do: pass --now to run one improvement run (the server runs them on schedule).")
            raise typer.Exit(code=2)
        overrides = {
            key: value
            for key, value in {
                "improve_steps": steps,
                "improve_imagined": imagined,
                "improve_eval_episodes": episodes,
            }.items()
            if value is not None
        }
        settings = Settings(**overrides)
        configure_logging(settings.log_level)
        raise typer.Exit(code=asyncio.run(_improve(settings)))


async def _improve(settings: Settings) -> int:
    task = load_task(settings.task)
    async with open_store(settings) as store:
        loop = ImprovementLoop(store=store, settings=settings, task=task)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            overall = bar.add_task("starting", total=len(STEPS))

            def on_step(step: str) -> None:
                bar.update(
                    overall,
                    description=f"step {STEPS.index(step) + 1}/{len(STEPS)}: {step}",
                    completed=STEPS.index(step),
                )

            loop.on_step = on_step
            run_task = asyncio.create_task(loop.run_once(trigger="cli"))
            event_loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):  # cancel: the child ends, the run is marked cancelled
                event_loop.add_signal_handler(signum, run_task.cancel)
            try:
                run = await run_task
            except ImprovementBusyError as error:
                console.print(f"[yellow]{error}[/yellow]")
                return 3
            except asyncio.CancelledError:
                console.print("[yellow]improvement run cancelled[/yellow]")
                return 130
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    event_loop.remove_signal_handler(signum)
            bar.update(overall, completed=len(STEPS), description="done")
        console.print(f"run #{run.id}: [bold]{run.status}[/bold]")
        for key, value in (run.metrics or {}).items():
            console.print(f"  {key}: {value}")
        if run.error:
            console.print(f"[red]{run.error}[/red]")
        console.print(f"logs: {settings.data_dir / 'runs' / f'run-{run.id}'}")
        return 0 if run.status in ("succeeded", "rejected") else 1
