"""``reverie dialogues export|import``: stored dialogues as JSON Lines (one ``DialogueRecord.to_dict()`` a line)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from bot.context import configure_logging, open_store
from bot.settings import Settings
from storage import DialogueRecord, Platform, Source, Store, StoreError

console = Console(stderr=True)
MAX_ERRORS_SHOWN = 20
# Where an imported dialogue says nothing about its platform.
DEFAULT_PLATFORM = {Source.IMAGINED: Platform.IMAGINED, Source.EVALUATION: Platform.SIM, Source.REAL: Platform.CONSOLE}


def _import_fingerprint(record: DialogueRecord) -> str:
    """Same source, task, turns and reward: the same dialogue (importing a file twice adds nothing)."""
    canonical = json.dumps(
        [record.source, record.task, record.reward, [(t.role, " ".join(t.text.split())) for t in record.turns]],
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


async def export_dialogues(store: Store, out: Any, *, source: str | None, task: str | None) -> int:
    """Write closed, consented dialogues as JSON Lines to the text stream ``out``; returns how many."""
    sources = [Source(source)] if source else list(Source)
    records = await store.dialogues_for_training(sources=sources, task=task, with_reward=False)
    for record in records:
        out.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    return len(records)


async def import_dialogues(store: Store, lines: list[str], *, origin: str) -> tuple[int, int, list[str]]:
    """Store each valid line; returns (imported, duplicates skipped, errors as 'origin:line: message')."""
    existing = await store.dialogues_for_training(sources=list(Source), with_reward=False)
    seen = {_import_fingerprint(record) for record in existing}
    imported, duplicates, errors = 0, 0, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = DialogueRecord.from_dict(json.loads(line))
            source = Source(record.source)
            platform = Platform(record.platform) if record.platform else DEFAULT_PLATFORM[source]
        except json.JSONDecodeError as error:
            errors.append(f"{origin}:{number}: not JSON: {error.msg} (column {error.colno})")
            continue
        except (StoreError, ValueError, TypeError) as error:
            errors.append(f"{origin}:{number}: {error}")
            continue
        key = _import_fingerprint(record)
        if key in seen:
            duplicates += 1
            continue
        meta = {**record.meta, "imported_from": origin}
        if "run_id" in meta:  # an imported copy must not count towards resuming the run that made it
            meta["original_run_id"] = meta.pop("run_id")
        if record.id is not None:
            meta["imported_id"] = record.id
        try:
            await store.save_dialogue(
                source=source,
                platform=platform,
                task=record.task,
                turns=[(t.role, t.text) for t in record.turns],
                reward=record.reward,
                reward_source="import" if record.reward is not None else None,
                persona=record.persona,
                meta=meta,
            )
        except StoreError as error:
            errors.append(f"{origin}:{number}: {error}")
            continue
        seen.add(key)
        imported += 1
    return imported, duplicates, errors


def register(app: typer.Typer) -> None:
    """Add ``dialogues export`` and ``dialogues import`` to the CLI."""
    dialogues_app = typer.Typer(help="Export and import stored dialogues as JSON Lines.", no_args_is_help=True)
    app.add_typer(dialogues_app, name="dialogues")

    @dialogues_app.command("export")
    def export(
        format: str = typer.Option("jsonl", "--format", help="Only 'jsonl' (one dialogue per line)."),
        source: str = typer.Option(None, "--source", help="imagined | real | evaluation (default: all)."),
        task: str = typer.Option(None, "--task", help="Only this task."),
        out: str = typer.Option("-", "--out", help="Output file, or '-' for standard output."),
    ) -> None:
        """Write closed, consented dialogues (forgotten users excluded) as JSON Lines.

        A file written with --out is registered: a later /forget removes that user's dialogues from it.
        """
        settings = Settings()
        # Log lines go to standard output (RichHandler), where they would corrupt the JSON Lines.
        configure_logging("WARNING" if out == "-" else settings.log_level)
        if format != "jsonl":
            console.print(f"[red]--format must be 'jsonl', not {format!r}[/red]")
            raise typer.Exit(code=2)
        if source is not None and source not in {s.value for s in Source}:
            console.print(f"[red]--source must be one of {', '.join(s.value for s in Source)}, not {source!r}[/red]")
            raise typer.Exit(code=2)

        async def run() -> int:
            async with open_store(settings) as store:
                if out == "-":
                    return await export_dialogues(store, sys.stdout, source=source, task=task)
                path = Path(out)
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(path.name + ".partial")
                # Registered first, so a /forget while this export is written still finds the file.
                await store.register_export(str(path.resolve()))
                with partial.open("w", encoding="utf-8") as stream:
                    count = await export_dialogues(store, stream, source=source, task=task)
                partial.replace(path)  # a reader never sees half a file
                return count

        count = asyncio.run(run())
        console.print(f"exported {count} dialogues" + ("" if out == "-" else f" to {out}"))

    @dialogues_app.command("import")
    def import_(file: Path = typer.Argument(..., help="A .jsonl file as written by 'dialogues export'.")) -> None:
        """Store every valid line of FILE; bad lines are reported with their line number and skipped."""
        settings = Settings()
        configure_logging(settings.log_level)
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            console.print(f"[red]{file}: cannot read: {error}[/red]")
            raise typer.Exit(code=2) from error

        async def run() -> tuple[int, int, list[str]]:
            async with open_store(settings) as store:
                return await import_dialogues(store, lines, origin=str(file))

        imported, duplicates, errors = asyncio.run(run())
        for message in errors[:MAX_ERRORS_SHOWN]:
            console.print(f"[red]{message}[/red]")
        if len(errors) > MAX_ERRORS_SHOWN:
            console.print(f"[red]… and {len(errors) - MAX_ERRORS_SHOWN} more bad lines[/red]")
        skipped = f", {duplicates} already in the database" if duplicates else ""
        console.print(f"imported {imported} dialogues{skipped}, {len(errors)} bad lines skipped")
        if errors:
            raise typer.Exit(code=1)
