"""``reverie``: the command line. Each subcommand lives in ``bot/commands/<name>.py``."""

from __future__ import annotations

import typer

from bot.commands import chat, db, dialogues, evaluate, generate, imagine, improve, policies, serve, train, world

app = typer.Typer(
    name="reverie",
    help="Reverie: a chat bot that teaches itself goal-directed conversation (offline RL on imagined dialogues).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
)

for module in (serve, chat, train, generate, imagine, world, dialogues, evaluate, improve, policies, db):
    module.register(app)


if __name__ == "__main__":
    app()
