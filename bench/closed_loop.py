"""The closed loop, measured through the real Telegram path: does the bot get better from its own conversations?

Starting from an empty data directory and no trained policy, every cycle:

1. ``--users`` simulated users with hidden personas (scripted users of the built-in task, fresh seeds each cycle,
   never the evaluation seeds) chat with the running bot through the fake Telegram Bot API and the real
   python-telegram-bot adapter; each ends with ``/end good`` or ``/end bad`` by the objective outcome and clicks
   👍/👎 on some replies (👍 where the reply asked about something the user had not said yet);
2. the served policy is evaluated on a fixed held-out set of personas (``--eval-episodes``, seed
   :data:`EVAL_SEED`);
3. one user of this cycle sends ``/forget``; then one improvement run goes through the same code the scheduler
   runs (``ImprovementLoop.run_scheduled``: imagine → mix the logged real conversations with fresh imagined ones →
   train → evaluate → gate → hot-swap), and the bench asserts that the forgotten user's conversations are not in
   the run's training set;
4. the next cycle's users meet whatever now serves, without a restart. The last cycle only measures (nobody
   would meet what a run after it trains).

Per cycle it reports the users' own success, the held-out success, the gate's decision, the active version and
the wall time of each step; ``--ablation`` repeats everything with real conversations left out of training
(``IMPROVE_REAL_RATIO=0``; ``--ablation-only`` runs that arm alone and adds it to the task's saved summary). Results
go to ``bench/results/closed_loop-<task>.json`` (``-quick`` with ``--quick``)::

    {"cycles": [{"cycle", "users_success", "eval_success", "promoted", "active_version", "minutes", ...}, ...],
     "ablation_no_real": {"cycles": [...]}}

and a plot of the learning curve next to it.

    .venv/bin/python bench/closed_loop.py --task travel --cycles 4 --ablation    # SmolLM2: hours on 2 CPU cores
    .venv/bin/python bench/closed_loop.py --quick                                 # tiny model, a few minutes

Each full run appends its table to BENCHMARKS.md (``--write-from`` appends a saved summary, e.g. of a run stopped
after some cycles).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from preamble import ROOT
from rich.console import Console
from rich.table import Table

from bench.benchmarks_md import machine, reproduce_command, run_heading, write_section

RESULTS = ROOT / "bench" / "results"
#: This bench's BENCHMARKS.md section.
SECTION = "Closed loop through Telegram: {task} (bench/closed_loop.py)"
#: Seed of the fixed held-out evaluation personas (users' seeds are ``USERS_SEED_BASE + cycle``, never this).
EVAL_SEED = 987_654
USERS_SEED_BASE = 10_000
USER_ID_BASE = 700_000
REPLY_TIMEOUT_S = 600.0
#: Chance that a user clicks 👍/👎 under an agent reply.
THUMBS_PROBABILITY = 0.3

console = Console(stderr=True)


@dataclass
class CycleResult:
    """One cycle: the users' conversations, the held-out evaluation, the improvement run after them."""

    cycle: int
    users_success: float
    eval_success: float
    promoted: bool
    active_version: int | None
    minutes: float
    run_status: str | None = None
    decision: str = ""
    n_imagined: int = 0
    n_real: int = 0
    forgotten_absent: bool | None = None
    step_minutes: dict[str, float] = field(default_factory=dict)


async def _user_conversation(
    server: Any, task: Any, persona: dict[str, Any], user_id: int, seed: tuple[Any, ...], max_turns: int
) -> bool:
    """One simulated user's whole conversation through the Bot API; returns whether it succeeded. Users speak the
    world's held-out phrasings: they stand for people whose words the policy never trained on."""
    from imagine.world import world_for

    scripted = world_for(task)
    user = scripted.make_user(persona, seed=seed, max_turns=max_turns, phrasings="heldout")
    rng = random.Random(repr(seed))
    await server.send_command(user_id, user_id, "start")
    agent = await server.next_message(user_id, timeout=REPLY_TIMEOUT_S)
    asked_before: set[str] = set()
    while True:
        asked = set(scripted.asked_attributes(agent["text"]))
        buttons = [b for row in agent.get("reply_markup", {}).get("inline_keyboard", []) for b in row]
        if buttons and rng.random() < THUMBS_PROBABILITY:
            vote = "up" if asked - asked_before else "down"
            data = next((b["callback_data"] for b in buttons if b.get("callback_data", "").endswith(vote)), None)
            if data is not None:
                await server.press_button(user_id, user_id, agent, data)
        asked_before |= asked
        turn = user.respond(agent["text"])
        if turn.done:
            break
        await server.send_text(user_id, user_id, turn.text)
        agent = await server.next_message(user_id, timeout=REPLY_TIMEOUT_S)
    success = (await user.score()) >= 0.5
    await server.send_command(user_id, user_id, "end", "good" if success else "bad")
    await server.next_message(user_id, timeout=REPLY_TIMEOUT_S)
    return success


async def _conversation_ids(store: Any, user_key: str) -> set[int]:
    from sqlmodel import select

    from storage import Conversation

    async with store.database.session() as session:
        return set((await session.exec(select(Conversation.id).where(Conversation.user_key == user_key))).all())


async def run_arm(
    args: argparse.Namespace,
    *,
    real_ratio: float | None,
    label: str,
    on_cycle: Callable[[list[CycleResult]], None] = lambda cycles: None,
) -> list[CycleResult]:
    """All cycles of one arm in a fresh data directory; ``real_ratio`` overrides ``IMPROVE_REAL_RATIO``;
    ``on_cycle`` sees the cycles so far after each one (the bench saves them: a long run stopped early keeps them)."""
    from bot.adapters.telegram import run_telegram
    from bot.improve import ImprovementLoop, make_improvement_hook
    from bot.server import open_runtime
    from bot.settings import Settings
    from imagine.task import load_task
    from imagine.world import world_for
    from learning.evaluation import evaluate_async
    from tests.fakes.telegram_api import FakeTelegramServer

    task = load_task(args.task)
    world_for(task)  # fails early, with the reason, for a task whose world does not compile
    results: list[CycleResult] = []
    keep = args.keep_data / label if args.keep_data else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=False)  # a fresh data directory, as the loop starts from nothing
    data_dir = contextlib.nullcontext(str(keep)) if keep else tempfile.TemporaryDirectory(prefix=f"reverie-cl-{label}-")
    with data_dir as tmp:
        async with FakeTelegramServer() as server:
            values: dict[str, Any] = {
                "data_dir": Path(tmp),
                "task": args.task,
                "base_model": args.base_model,
                "imagine_backend": "auto",
                "openai_base_url": None,
                "openai_api_key": None,
                "telegram_token": server.token,
                "telegram_base_url": server.base_url,
                "improve_enabled": False,  # no cron: the bench calls the scheduled job itself, once per cycle
                "improve_on_first_start": False,
                "log_level": "WARNING",
            }
            if real_ratio is not None:
                values["improve_real_ratio"] = real_ratio
            if args.model_cache_dir:
                values["model_cache_dir"] = args.model_cache_dir
            values.update(args.overrides)
            settings = Settings(_env_file=None, **values)
            async with open_runtime(settings, improver_hook=make_improvement_hook(sync_interval_s=3600)) as runtime:
                loop = runtime.service.improver
                assert isinstance(loop, ImprovementLoop)
                console.print(f"[{label}] imagination: {loop.imagination().describe()}")
                stop = asyncio.Event()
                polling = asyncio.create_task(run_telegram(runtime.service, settings, stop, poll_timeout_s=5))
                try:
                    await server.wait_for_call("getUpdates", timeout=120)
                    for cycle in range(args.cycles):
                        measured = lambda partial: on_cycle([*results, partial])  # noqa: E731
                        results.append(
                            await _cycle(args, cycle, label, server, runtime, loop, task, evaluate_async, measured)
                        )
                        _print_cycle(results[-1], label)
                        on_cycle(results)
                finally:
                    stop.set()
                    await asyncio.wait_for(polling, 120)
    return results


async def _cycle(
    args: argparse.Namespace,
    cycle: int,
    label: str,
    server: Any,
    runtime: Any,
    loop: Any,
    task: Any,
    evaluate: Any,
    on_measured: Callable[[CycleResult], None],
) -> CycleResult:
    """One cycle: the users' conversations, the held-out evaluation (``on_measured`` hears them before the
    improvement run starts, so a run stopped during it keeps them), then one improvement run. Users are personas of
    value combinations never trained on."""
    from imagine.world import world_for

    started = time.perf_counter()
    steps: dict[str, float] = {}
    personas = world_for(task).sample_personas(args.users, USERS_SEED_BASE + cycle, split="heldout")
    ids = [USER_ID_BASE + 1000 * cycle + i for i in range(args.users)]
    clock = time.perf_counter()
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(index: int) -> bool:
        async with semaphore:
            seed = ("closed-loop", label, cycle, index)
            return await _user_conversation(server, task, personas[index], ids[index], seed, task.max_turns)

    outcomes = await asyncio.gather(*(one(i) for i in range(args.users)))
    steps["users"] = (time.perf_counter() - clock) / 60

    clock = time.perf_counter()
    with runtime.policies.current() as policy:
        report = await evaluate(
            [policy], task, users="scripted", episodes=args.eval_episodes, seed=EVAL_SEED, progress=False
        )
    eval_success = report.results[0].success_rate
    steps["eval"] = (time.perf_counter() - clock) / 60

    users_success = sum(outcomes) / len(outcomes)
    measured = CycleResult(
        cycle=cycle,
        users_success=users_success,
        eval_success=eval_success,
        promoted=False,
        active_version=runtime.policies.version_id,
        minutes=(time.perf_counter() - started) / 60,
        step_minutes={k: round(v, 2) for k, v in steps.items()},
    )
    if cycle == args.cycles - 1:  # nobody would meet what a last run trains: measure, don't improve
        return measured
    on_measured(measured)

    # One user of this cycle asks to be forgotten before the run: none of their words may be trained on.
    forgetter = f"telegram:{ids[0]}"
    forgotten = await _conversation_ids(runtime.store, forgetter)
    await server.send_command(ids[0], ids[0], "forget")
    await server.next_message(ids[0], timeout=REPLY_TIMEOUT_S)
    trained_ids: set[int] = set()
    step_started: dict[str, float] = {}

    def on_step(step: str) -> None:
        step_started[step] = time.perf_counter()
        if step == "train":
            for path in (runtime.settings.data_dir / "runs").glob("run-*/dialogues.jsonl"):
                for line in path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    if record.get("source") == "real" and record.get("id") is not None:
                        trained_ids.add(int(record["id"]))

    loop.on_step = on_step
    clock = time.perf_counter()
    await loop.run_scheduled()  # what the scheduler runs
    finished = time.perf_counter()
    steps["improve"] = (finished - clock) / 60
    # The run's own steps (imagine, select, train, evaluate, gate), each until the next one started.
    marks = [*sorted(step_started.items(), key=lambda item: item[1]), ("end", finished)]
    for (name, begin), (_, end) in itertools.pairwise(marks):
        steps[f"improve.{name}"] = (end - begin) / 60
    run = await runtime.store.last_training_run()
    forgotten_absent = not (forgotten & trained_ids)
    if not forgotten_absent:
        raise AssertionError(
            f"cycle {cycle}: the run trained on conversations of {forgetter}, who asked to be forgotten"
        )
    return replace(
        measured,
        promoted=run is not None and run.status == "succeeded",
        active_version=runtime.policies.version_id,
        minutes=(time.perf_counter() - started) / 60,
        run_status=run.status if run else None,
        decision=(run.metrics or {}).get("decision", "") if run else "",
        n_imagined=run.n_imagined if run else 0,
        n_real=run.n_real if run else 0,
        forgotten_absent=forgotten_absent,
        step_minutes={k: round(v, 2) for k, v in steps.items()},
    )


def _print_cycle(result: CycleResult, label: str) -> None:
    console.print(
        f"[{label}] cycle {result.cycle}: users {result.users_success:.0%}, held-out {result.eval_success:.0%}, "
        f"run {result.run_status} ({result.n_imagined} imagined + {result.n_real} real), active version "
        f"{result.active_version}, {result.minutes:.1f} min {result.step_minutes}"
    )


def table(cycles: list[CycleResult], title: str) -> Table:
    """The cycles as a rich table."""
    out = Table(title=title)
    for column in ("cycle", "users", "held-out", "run", "active", "minutes", "decision"):
        out.add_column(column)
    for c in cycles:
        out.add_row(
            str(c.cycle),
            f"{c.users_success:.0%}",
            f"{c.eval_success:.0%}",
            str(c.run_status),
            str(c.active_version),
            f"{c.minutes:.1f}",
            c.decision[:80],
        )
    return out


def plot(summary: dict[str, Any], path: Path, task: str) -> None:
    """The learning curve: users' and held-out success per cycle, with the ablation dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(6, 4))
    arms = [("with real", summary["cycles"], "-")]
    if summary.get("ablation_no_real"):
        arms.append(("no real (ablation)", summary["ablation_no_real"]["cycles"], "--"))
    for name, cycles, style in arms:
        x = [c["cycle"] for c in cycles]
        axis.plot(x, [c["users_success"] for c in cycles], style, marker="o", label=f"users, {name}")
        axis.plot(x, [c["eval_success"] for c in cycles], style, marker="s", label=f"held-out, {name}")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # cycles are whole numbers
    axis.set_xlabel("cycle (0 = prompted base model)")
    axis.set_ylabel("success rate")
    axis.set_ylim(0, 1)
    axis.set_title(f"Closed loop through Telegram: {task}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


QUICK = {
    "improve_imagined": 16,
    "improve_steps": 4,
    "improve_value_steps": 10,
    "improve_eval_episodes": 8,
    "max_new_tokens": 8,
}


def markdown(summary: dict[str, Any], command: str, load: float) -> str:
    """The BENCHMARKS.md block of one run: per arm, one row per cycle."""
    quiet = "quiet: nothing else ran" if load < 2.5 else "NOT quiet: other work shared the CPU"
    lines = [
        run_heading(command),
        "",
        f"{machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the end ({quiet}). Base model "
        f"{summary['base_model']}, {summary['users_per_cycle']} simulated users per cycle through the fake Bot API "
        f"and the real python-telegram-bot adapter, held-out evaluation {summary['eval_episodes']} episodes "
        f"(seed {EVAL_SEED}) per cycle; cycle 0 meets the prompted base model; each improvement run is the "
        "scheduler's job with the embedded defaults. Complete: "
        f"{'yes' if summary.get('complete') else 'no (stopped early; the cycles measured so far)'}.",
    ]
    arms = [("with real conversations (IMPROVE_REAL_RATIO default)", summary["cycles"])]
    if summary.get("ablation_no_real"):
        arms.append(("ablation: real conversations left out (ratio 0)", summary["ablation_no_real"]["cycles"]))
    for title, cycles in arms:
        lines += [
            "",
            f"**{title}**",
            "",
            "| cycle | users' success | held-out success | run → promoted? | active version | imagined + real | "
            "minutes (users · eval · improve) | gate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in cycles:
            steps = c.get("step_minutes", {})
            improve = steps.get("improve")
            timing = f"{c['minutes']:.1f} ({steps.get('users', 0):.1f} · {steps.get('eval', 0):.1f} · " + (
                f"{improve:.1f})" if improve is not None else "—)"
            )
            run = f"{c['run_status']} → {'yes' if c['promoted'] else 'no'}" if c.get("run_status") else "—"
            data = f"{c['n_imagined']} + {c['n_real']}" if c.get("run_status") else "—"
            lines.append(
                f"| {c['cycle']} | {c['users_success']:.0%} | {c['eval_success']:.0%} | {run} | "
                f"{c['active_version']} | {data} | {timing} | {c.get('decision', '')[:120]} |"
            )
    lines += ["", f"![learning curve](bench/results/closed_loop-{summary['task']}.png)"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` is the tiny model with small counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="travel", help="a built-in task's name or the path of a task TOML")
    parser.add_argument("--cycles", type=int, default=4, help="Cycles, the first one on the prompted base model.")
    parser.add_argument("--users", type=int, default=24, help="Simulated users per cycle.")
    parser.add_argument("--concurrency", type=int, default=8, help="Users chatting at once.")
    parser.add_argument("--eval-episodes", type=int, default=100, help="Held-out episodes per cycle.")
    parser.add_argument("--base-model", default="smollm2")
    parser.add_argument("--model-cache-dir", default=None)
    parser.add_argument("--ablation", action="store_true", help="Repeat with real conversations left out (ratio 0).")
    parser.add_argument(
        "--ablation-only",
        action="store_true",
        help="Run only the arm without real conversations and add it to the task's existing summary JSON "
        "(the two arms take an hour each on 2 CPU cores, so they can run on different days).",
    )
    parser.add_argument("--quick", action="store_true", help="Tiny model, 2 cycles of 6 users: checks the plumbing.")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep-data",
        type=Path,
        default=None,
        help="Keep each arm's data directory (database, runs, checkpoints) under this new directory.",
    )
    parser.add_argument("--no-write", action="store_true", help="Do not append to BENCHMARKS.md.")
    parser.add_argument(
        "--write-from",
        type=Path,
        default=None,
        help="Only append an earlier run's summary JSON to BENCHMARKS.md (e.g. a run stopped after some cycles).",
    )
    args = parser.parse_args(argv)
    args.overrides = {}
    if args.quick:
        args.base_model, args.cycles, args.users, args.eval_episodes = "tiny", 2, 6, 8
        args.overrides = dict(QUICK)
    from imagine.task import load_task

    args.task_name = load_task(args.task).name  # files and headings use the task's name, whatever --task was
    if args.ablation_only and not summary_path(args).is_file():
        parser.error(f"--ablation-only adds to {summary_path(args)}, which does not exist: run the main arm first")
    return args


def summary_path(args: argparse.Namespace) -> Path:
    """Where the JSON summary goes (``-quick`` for the plumbing check)."""
    return args.out_dir / f"closed_loop-{args.task_name}{'-quick' if args.quick else ''}.json"


def save(summary: dict[str, Any], args: argparse.Namespace) -> Path:
    """Write the summary JSON and its plot; returns the JSON's path."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = summary_path(args)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot(summary, path.with_suffix(".png"), args.task_name)
    return path


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Both arms; the summary JSON's content, saved after every cycle (``"complete": false`` until the end)."""
    summary: dict[str, Any] = {
        "task": args.task_name,
        "task_file": args.task,
        "base_model": args.base_model,
        "users_per_cycle": args.users,
        "eval_episodes": args.eval_episodes,
        "quick": args.quick,
        "complete": False,
        "cycles": [],
        "ablation_no_real": None,
    }

    def saver(key: str) -> Callable[[list[CycleResult]], None]:
        def on_cycle(cycles: list[CycleResult]) -> None:
            rows = [asdict(c) for c in cycles]
            if key == "cycles":
                summary["cycles"] = rows
            else:
                summary["ablation_no_real"] = {"cycles": rows}
            save(summary, args)

        return on_cycle

    if args.ablation_only:
        earlier = json.loads(summary_path(args).read_text(encoding="utf-8"))
        summary["cycles"] = earlier["cycles"]
    else:
        await run_arm(args, real_ratio=None, label="real", on_cycle=saver("cycles"))
    if args.ablation or args.ablation_only:
        await run_arm(args, real_ratio=0.0, label="no-real", on_cycle=saver("ablation"))
    summary["complete"] = True
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the table, write the JSON summary and the plot."""
    args = parse_args(argv)
    if args.write_from is not None:
        summary = json.loads(args.write_from.read_text(encoding="utf-8"))
        command = reproduce_command(__file__, ["--task", summary.get("task_file", summary["task"])])
        write_section(SECTION.format(task=summary["task"]), markdown(summary, command, os.getloadavg()[0]))
        return 0
    logging.basicConfig(level=logging.WARNING)
    summary = asyncio.run(main_async(args))
    json_path = save(summary, args)
    if not (args.quick or args.no_write):
        block = markdown(summary, reproduce_command(__file__), os.getloadavg()[0])
        write_section(SECTION.format(task=args.task_name), block)
    console.print(table([CycleResult(**c) for c in summary["cycles"]], f"closed loop: {args.task_name}"))
    if summary["ablation_no_real"]:
        ablation = [CycleResult(**c) for c in summary["ablation_no_real"]["cycles"]]
        console.print(table(ablation, f"closed loop: {args.task_name}, no real conversations"))
    console.print(f"summary: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
