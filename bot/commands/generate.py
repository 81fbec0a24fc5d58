"""``reverie generate``: one agent reply from a checkpoint (or the prompted base model) for a given history."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bot.commands import console
from bot.context import configure_logging
from bot.settings import Settings


def parse_turn(text: str) -> tuple[str, str]:
    """``"user: hi"`` / ``"agent: hello"`` → ``(role, text)``; a turn without a prefix is the user's."""
    role, sep, rest = text.partition(":")
    if sep and role.strip().lower() in ("user", "agent"):
        return role.strip().lower(), rest.strip()
    return "user", text.strip()


def register(app: typer.Typer) -> None:
    """Add ``generate`` to the CLI."""

    @app.command("generate")
    def generate(
        source: str = typer.Argument("base", help="A checkpoint directory or 'base'."),
        turn: list[str] = typer.Option(None, "--turn", "-t", help="'user: …' or 'agent: …', in order; repeatable."),
        history_file: Path = typer.Option(None, help="JSON list of {role, text}."),
        task: str = typer.Option(None, help="Task name or TOML path (default: TASK setting)."),
        base_model: str = typer.Option(None, help="smollm2 | tiny | a path (default BASE_MODEL)."),
        beta: float = typer.Option(None, help="ILQL β override (token level)."),
        temperature: float = typer.Option(None),
        seed: int = typer.Option(None),
    ) -> None:
        """Print one agent reply for the history (the task's opening line is prepended when it is empty)."""
        from imagine.task import TaskSpecError, load_task
        from learning.interface import Message
        from learning.policy import PolicyLoadError, load_policy

        settings = Settings()
        configure_logging("WARNING")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # stdout carries the reply alone
        try:
            spec = load_task(task or settings.task)
            if history_file is not None:
                raw = json.loads(history_file.read_text(encoding="utf-8"))
                turns = [(str(t["role"]), str(t["text"])) for t in raw]
            else:
                turns = [parse_turn(t) for t in turn or []]
            history = [Message(role="agent" if r == "agent" else "user", text=x) for r, x in turns]
            if not history or history[0].role != "agent":
                history.insert(0, Message(role="agent", text=spec.opening_line))
            policy = load_policy(
                source,
                task=spec,
                base_model=base_model or settings.base_model,
                cache_dir=settings.resolved_model_cache_dir,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature if temperature is None else temperature,
                top_k=settings.top_k,
                beta=settings.beta if beta is None else beta,
            )
        except (TaskSpecError, PolicyLoadError, OSError, ValueError, KeyError, TypeError) as error:
            console.print(f"[red]reverie generate: {error}[/red]")
            raise typer.Exit(code=1) from error
        try:
            reply = policy.respond_batch([history], seed=seed)[0]
        finally:
            policy.close()
        typer.echo(reply)
