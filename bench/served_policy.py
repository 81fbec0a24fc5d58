"""Benchmark: a trained policy alone against the same policy as the bot serves it (behind its reply guard).

The bot never sends a policy's reply unchecked: :class:`bot.reply_guard.ReplyGuard` replaces degenerate text and a
question about something the user already said. ``bench/rl_vs_bc.py`` measures the policy alone (what learning
achieved); this measures what a customer gets, both on the same held-out users (paired), so the guard's share of
the result is visible rather than hidden in it.

    .venv/bin/python bench/served_policy.py --task examples/houseplants.toml --checkpoint PATH

Prints a table, appends it to BENCHMARKS.md (section "Served policy: alone vs behind the reply guard") and writes
``bench/results/served_policy-<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from preamble import ROOT
from rich.console import Console
from rich.table import Table

from bench.benchmarks_md import reproduce_command, run_heading, write_section
from bot.reply_guard import ReplyGuard
from imagine.task import load_task
from learning.evaluation import evaluate
from learning.interface import History, Policy

SECTION = "Served policy: alone vs behind the reply guard (bench/served_policy.py)"


class GuardedPolicy:
    """A policy whose every reply passes the bot's reply guard, as ``DialogueService`` sends it."""

    def __init__(self, policy: Policy, guard: ReplyGuard) -> None:
        self.policy = policy
        self.guard = guard
        self.name = f"{policy.name} + guard"
        self.version_id = policy.version_id
        #: how many replies the guard replaced
        self.replaced = 0

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        replies = self.policy.respond_batch(histories, seed=seed)
        reviewed = [self.guard.review(history, reply) for history, reply in zip(histories, replies, strict=True)]
        self.replaced += sum(review.replaced is not None for review in reviewed)
        return [review.text for review in reviewed]

    async def respond(self, history: History) -> str:
        return self.respond_batch([history])[0]

    def close(self) -> None:
        """The wrapped policy is closed by its owner."""


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write its table and summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="a built-in task's name or the path of a task TOML")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a trained policy's checkpoint directory")
    parser.add_argument("--base-model", default="smollm2")
    parser.add_argument("--episodes", type=int, default=200, help="held-out episodes (200)")
    parser.add_argument("--eval-seed", type=int, default=1000, help="the users' seed (rl_vs_bc's default: 1000)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from learning.policy import load_policy

    task = load_task(args.task)
    load_start = os.getloadavg()[0]
    policy = load_policy(args.checkpoint, task=task, base_model=args.base_model)
    guarded = GuardedPolicy(policy, ReplyGuard(task))
    started = time.perf_counter()
    try:
        report = evaluate([policy, guarded], task, episodes=args.episodes, seed=args.eval_seed, split="heldout")
    finally:
        policy.close()
    minutes = (time.perf_counter() - started) / 60
    rows = [
        (result.name, result.success_rate, *result.interval, result.re_ask_rate, result.outcomes())
        for result in report.results
    ]
    table = Table(title=f"{task.name}: policy alone vs served behind the reply guard ({args.episodes} held-out users)")
    for column in ("policy", "success", "95% interval", "re-asks", "outcomes"):
        table.add_column(column)
    for name, success, low, high, re_ask, outcomes in rows:
        table.add_row(name, f"{success:.1%}", f"{low:.1%}–{high:.1%}", f"{re_ask:.1%}", str(outcomes))
    Console().print(table)
    print(f"guard replaced {guarded.replaced} replies; {minutes:.1f} min")
    if args.no_write:
        return 0
    command = reproduce_command(__file__, argv)
    lines = [
        run_heading(command),
        "",
        f"Load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (quiet: nothing else ran). "
        f"{args.episodes} held-out users (seed {args.eval_seed}: value combinations and phrasings never trained on, "
        f"the same users as `bench/rl_vs_bc.py`), both rows the same checkpoint decoding greedily; the second sends "
        f"every reply through the bot's reply guard, which replaced {guarded.replaced} replies. {minutes:.1f} min.",
        "",
        "| policy | success | 95% interval | re-asks | outcomes |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {success:.1%} | {low:.1%}–{high:.1%} | {re_ask:.1%} | {outcomes} |"
            for name, success, low, high, re_ask, outcomes in rows
        ),
    ]
    write_section(SECTION, "\n".join(lines) + "\n")
    summary = {
        "task": task.name,
        "checkpoint": str(args.checkpoint),
        "episodes": args.episodes,
        "guard_replaced": guarded.replaced,
        "policies": {
            name: {"success": success, "ci95": [low, high], "re_ask_rate": re_ask, "outcomes": outcomes}
            for name, success, low, high, re_ask, outcomes in rows
        },
    }
    out = ROOT / "bench" / "results" / f"served_policy-{task.name}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
