"""``reverie policies``: list, add, activate and roll back trained policy versions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.table import Table

from bot.commands import console
from bot.context import open_store
from bot.improve import ImprovementLoop, register_checkpoint
from bot.settings import Settings
from imagine.task import load_task
from storage import StoreError

policies_app = typer.Typer(help="Trained policy versions: list, add, activate, roll back.", no_args_is_help=True)


@policies_app.command("list")
def list_versions(limit: int = typer.Option(20, help="How many, newest first.")) -> None:
    """Show policy versions with status, algorithm and evaluation metrics."""

    async def main() -> None:
        async with open_store(Settings()) as store:
            versions = await store.list_policy_versions(limit=limit)
        table = Table(title="Policy versions (a running bot picks up changes within a minute)")
        for column in ("id", "status", "algorithm", "success", "created (UTC)", "checkpoint"):
            table.add_column(column)
        for v in versions:
            success = v.metrics.get("success_rate")
            table.add_row(
                str(v.id),
                v.status,
                v.algorithm,
                "—" if success is None else f"{float(success):.1%}",
                f"{v.created_at:%Y-%m-%d %H:%M}",
                v.path if Path(v.path).is_dir() else f"{v.path} (pruned)",
            )
        console.print(table if versions else "No trained policy yet: the prompted base model serves.")

    asyncio.run(main())


async def add_checkpoint(settings: Settings, path: Path, *, origin: str) -> int:
    """Register the checkpoint at ``path`` as a candidate version and say how to serve it; returns the exit
    status (1, with the reason, when ``path`` is not an intact checkpoint: nothing is registered then)."""
    from learning.checkpoint import CheckpointError

    async with open_store(settings) as store:
        try:
            version = await register_checkpoint(store, path, metrics={"registered_by": origin})
        except (CheckpointError, OSError) as error:
            console.print(f"[red]{path} cannot be registered: {error}; nothing was changed[/red]")
            return 1
    console.print(
        f"registered {version.path} as policy version {version.id} ({version.algorithm}, {version.status}); "
        f"serve it with: reverie policies activate {version.id}"
    )
    return 0


@policies_app.command("add")
def add(path: Path = typer.Argument(..., help="A checkpoint directory (what `reverie train` writes).")) -> None:
    """Register a checkpoint as a candidate version (verified first), so `activate` can serve it."""
    raise typer.Exit(code=asyncio.run(add_checkpoint(Settings(), path, origin="reverie policies add")))


@policies_app.command("activate")
def activate(version_id: int = typer.Argument(..., help="Version id from `reverie policies list`.")) -> None:
    """Make a version active (its checkpoint is verified first)."""

    async def main() -> int:
        async with open_store(Settings()) as store:
            version = await store.get_policy_version(version_id)
            if version is None:
                console.print(f"[red]no policy version {version_id}[/red]")
                return 1
            from learning.checkpoint import CheckpointError, verify_checkpoint

            try:
                sha256 = verify_checkpoint(Path(version.path))
            except (CheckpointError, OSError) as error:
                console.print(f"[red]version {version_id} cannot be activated: {error}[/red]")
                return 1
            if sha256 != version.sha256:
                console.print(
                    f"[red]version {version_id} cannot be activated: the checkpoint at {version.path} was replaced "
                    "since it was registered (another training run wrote there?); register it again with "
                    "`reverie policies add`[/red]"
                )
                return 1
            try:
                await store.activate_policy_version(version_id)
            except StoreError as error:
                console.print(f"[red]{error}[/red]")
                return 1
        console.print(f"version {version_id} is active (a running bot serves it within a minute)")
        return 0

    raise typer.Exit(code=asyncio.run(main()))


@policies_app.command("rollback")
def rollback() -> None:
    """Go back to the previously active version (or the base model)."""

    async def main() -> None:
        settings = Settings()
        async with open_store(settings) as store:
            loop = ImprovementLoop(store=store, settings=settings, task=load_task(settings.task))
            console.print(await loop.rollback(requested_by="cli"))

    asyncio.run(main())


def register(app: typer.Typer) -> None:
    """Add ``policies`` to the CLI."""
    app.add_typer(policies_app, name="policies")
