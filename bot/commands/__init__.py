"""CLI subcommands, one module each; every module exposes ``register(app)``."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)


def not_implemented(what: str) -> None:
    """Exit non-zero: a command that does not work yet never pretends to."""
    console.print(f"[red]{what}: not implemented yet[/red]")
    raise typer.Exit(code=2)
