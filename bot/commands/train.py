"""``reverie train``: BC, filtered BC or ILQL on imagined and real dialogues; writes a checkpoint directory.

``--job FILE`` (a :class:`bot.jobs.TrainJob`, what the improvement loop writes) gives the whole training config
instead of the options. Data comes from ``--dialogues FILE.jsonl`` (``DialogueRecord.to_dict()`` lines, as the
improvement loop writes them) or, without it, from the database (closed, rewarded dialogues of ``--task``). Bad
data exits with status 1 and a message that says what is wrong.

The checkpoint is registered as a candidate policy version (``reverie policies activate ID`` serves it), unless
``--no-register`` or ``--job`` (the improvement loop registers its candidates itself, after the gate), and only by
the main replica of a distributed run.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import typer

from bot.commands import console
from bot.context import configure_logging, open_store
from bot.settings import Settings
from learning.algorithms import ALGORITHMS, DEFAULT_ALGORITHM


def register(app: typer.Typer) -> None:
    """Add ``train`` to the CLI."""

    @app.command("train")
    def train(
        algo: str = typer.Option(DEFAULT_ALGORITHM, help=" | ".join(ALGORITHMS)),
        task: str = typer.Option(None, help="Task name or TOML path (default: TASK setting)."),
        dialogues: Path = typer.Option(None, help="JSONL of dialogues; default: read from the database."),
        real_ratio: float = typer.Option(None, help="Share of real dialogues per batch (default IMPROVE_REAL_RATIO)."),
        steps: int = typer.Option(None, help="Policy-stage optimizer steps (default IMPROVE_STEPS)."),
        value_steps: int = typer.Option(None, help="Value-stage steps (ILQL) on cached features."),
        out: Path = typer.Option(None, help="Checkpoint directory (default DATA_DIR/policies/<algo>-<time>)."),
        init_from: Path = typer.Option(None, help="Continue from this checkpoint's adapter."),
        base_model: str = typer.Option(None, help="smollm2 | tiny | a path (default BASE_MODEL)."),
        seed: int = typer.Option(0),
        batch_size: int = typer.Option(None),
        device: str = typer.Option(None, help="auto | cpu | cuda (default DEVICE)."),
        time_limit_minutes: float = typer.Option(None, help="Stop and save when this much time has passed."),
        quiet: bool = typer.Option(False, help="No progress bar."),
        register: bool = typer.Option(
            True, "--register/--no-register", help="Register the checkpoint as a candidate policy version."
        ),
        job: Path = typer.Option(
            None,
            help="A job file (bot.jobs.TrainJob, as the improvement loop writes it): its config, dialogues "
            "and init-from replace the options above; --out still says where the checkpoint goes.",
        ),
    ) -> None:
        """Train a policy checkpoint (the default algorithm unless --algo) and print its path."""
        from bot.jobs import JobError, TrainJob, train_config
        from learning.checkpoint import CheckpointError
        from learning.dataset import DatasetError
        from learning.training import TrainingError, load_dialogues_jsonl
        from learning.training import train as run_training

        settings = Settings()
        configure_logging(settings.log_level)
        try:
            from imagine.task import TaskSpecError, load_task

            loaded = TrainJob.from_json(job) if job is not None else None
            spec = load_task(loaded.config.task if loaded else task or settings.task)
        except (TaskSpecError, JobError) as error:
            console.print(f"[red]reverie train: {error}[/red]")
            raise typer.Exit(code=1) from error
        try:
            if loaded is not None:
                config = loaded.config
                dialogues = Path(loaded.dialogues)
                init_from = Path(loaded.init_from) if loaded.init_from else None
            else:
                config = train_config(
                    settings,
                    algorithm=algo,
                    task=spec.name,
                    seed=seed,
                    base_model=base_model,
                    real_ratio=real_ratio,
                    steps=steps,
                    value_steps=value_steps,
                    batch_size=batch_size,
                    device=device,
                    time_limit_minutes=time_limit_minutes,
                )
            if dialogues is not None:
                records = load_dialogues_jsonl(dialogues)
            else:
                records = asyncio.run(_from_database(settings, spec.name))
            target = out or settings.checkpoints_dir / f"{config.resolved_algorithm}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
            path = run_training(config, records, out_dir=target, init_from=init_from, progress=not quiet, task=spec)
        except (DatasetError, TrainingError, CheckpointError) as error:
            console.print(f"[red]reverie train: {error}[/red]")
            raise typer.Exit(code=1) from error
        except KeyboardInterrupt as error:
            console.print("[yellow]interrupted: run the same command again to resume[/yellow]")
            raise typer.Exit(code=130) from error
        logging.getLogger(__name__).info("checkpoint written to %s", path)
        typer.echo(str(path))
        if register and job is None and int(os.environ.get("RANK", "0")) == 0:
            from bot.commands.policies import add_checkpoint

            try:
                failed = asyncio.run(add_checkpoint(settings, path, origin="reverie train"))
            except Exception as error:  # the database: the checkpoint itself is fine
                from bot import redaction

                console.print(
                    redaction.redact(f"[red]cannot register the checkpoint: {type(error).__name__}: {error}[/red]")
                )
                failed = 1
            if failed:
                console.print(f"[yellow]the checkpoint is kept; register it with: reverie policies add {path}[/yellow]")
                raise typer.Exit(code=1)


async def _from_database(settings: Settings, task: str) -> list:
    async with open_store(settings) as store:
        return await store.dialogues_for_training(task=task)
