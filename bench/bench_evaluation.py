"""Benchmark: scripted dialogue generation and evaluation throughput (and a learned policy's, if available).

Usage: ``.venv/bin/python bench/bench_evaluation.py [--episodes 200] [--base-model tiny|smollm2] [--no-append]``
Prints a rich table and appends a Markdown section to BENCHMARKS.md with the reproducing command.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from preamble import ROOT  # noqa: F401 (before the project imports: the root importable, HF offline)
from rich.console import Console
from rich.table import Table

from bench.benchmarks_md import machine, reproduce_command, run_heading, write_section

SECTION = "Simulated users: generation and evaluation throughput"

from imagine.simulated import BEHAVIOURS, BehaviourPolicy, generate_scripted_dialogues  # noqa: E402
from imagine.task import TaskSpec, load_task  # noqa: E402
from learning.evaluation import evaluate  # noqa: E402

Row = tuple[str, str, int, float, str]


def _timed(label: str, unit: str, count: int, run: Callable[[], str]) -> Row:
    start = time.perf_counter()
    note = run()
    seconds = time.perf_counter() - start
    return (label, unit, count, seconds, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--dialogues", type=int, default=2000)
    parser.add_argument("--base-model", default="tiny", help="base model for the learned-policy row (tiny|smollm2)")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument(
        "--tasks",
        default="travel,teaching,examples/houseplants.toml",
        help="comma-separated built-in task names or task TOML paths",
    )
    args = parser.parse_args()
    rows: list[Row] = []
    for spec in (load_task(t.strip()) for t in args.tasks.split(",") if t.strip()):

        def generate(spec: TaskSpec = spec) -> str:
            records = generate_scripted_dialogues(spec, args.dialogues, seed=0)
            return f"success {sum(r.reward or 0 for r in records) / len(records):.1%}"

        rows.append(_timed(f"generate scripted ({spec.name})", "dialogues", args.dialogues, generate))

        def run_eval(spec: TaskSpec = spec) -> str:
            policies = [BehaviourPolicy(spec, name) for name in BEHAVIOURS]
            report = evaluate(policies, spec, episodes=args.episodes, seed=0, progress=False)
            return ", ".join(f"{r.name.removeprefix('scripted:')} {r.success_rate:.0%}" for r in report.results)

        rows.append(_timed(f"evaluate 4 scripted agents ({spec.name})", "episodes", 4 * args.episodes, run_eval))
    try:
        from learning.policy import load_policy
    except ImportError:
        load_policy = None
    if load_policy is not None:
        task = load_task("travel")
        policy = load_policy("base", task=task, base_model=args.base_model)

        def run_base() -> str:
            report = evaluate([policy], task, episodes=args.episodes, seed=0, progress=False)
            result = report.results[0]
            return f"success {result.success_rate:.0%}, {result.mean_turns:.1f} agent turns/episode"

        try:
            rows.append(_timed(f"evaluate base {args.base_model} (travel)", "episodes", args.episodes, run_base))
        finally:
            policy.close()

    table = Table(title="Simulated users: generation and evaluation throughput")
    for column in ("what", "count", "seconds", "per second", "result"):
        table.add_column(column, justify="left" if column in ("what", "result") else "right")
    for label, unit, count, seconds, note in rows:
        table.add_row(label, f"{count} {unit}", f"{seconds:.2f}", f"{count / seconds:,.0f}", note)
    Console().print(table)
    if not args.no_append:
        lines = [
            run_heading(reproduce_command(__file__)),
            "",
            f"Machine: {machine()}, CPU only.",
            "",
            "| what | count | seconds | per second | result |",
            "|---|---:|---:|---:|---|",
            *[f"| {lbl} | {n} {u} | {s:.2f} | {n / s:,.0f} | {note} |" for lbl, u, n, s, note in rows],
        ]
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
