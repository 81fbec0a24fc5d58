"""Load on the Telegram path: N simulated chats at once through the fake Bot API server.

Every chat sends ``--messages`` messages, each after the previous reply arrived (like a person would). Measured per
policy and N: reply latency (message injected → reply seen by the fake server) p50/p99, messages lost (sent
without a reply; must be 0), user turns logged in the database (must equal messages sent), apologies, throughput.
The real python-telegram-bot (with its rate limiter), the real DialogueService and a real SQLite store are used.

    .venv/bin/python bench/bot_load.py            # tiny and SmolLM2 policies, N = 1, 8, 32
    .venv/bin/python bench/bot_load.py --quick    # tiny policy only
    # the issue's acceptance run: prompted SmolLM2 and the trained default policy, idle and during training
    .venv/bin/python bench/bot_load.py --policies smollm2,checkpoint:PATH --during-training --quiet-machine

``--during-training`` repeats every load while a real ``reverie train`` child runs through
``bot.subprocesses.run_step`` exactly as the improvement loop starts it (niced, confined to the CPUs serving
does not use). Results are printed as a rich table, appended as markdown to BENCHMARKS.md (section "Telegram
bot load", saying whether the machine was declared quiet) and summarised in ``bench/results/bot_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from preamble import ROOT
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from bench.benchmarks_md import reproduce_command, run_heading, write_section
from imagine.task import load_task

SECTION = "Telegram bot load (bench/bot_load.py)"
RESULTS = ROOT / "bench" / "results" / "bot_load.json"
USER_ID_BASE = 50_000
REPLY_TIMEOUT_S = 300.0
#: How often ``/metrics`` is scraped during a load (Prometheus scrapes every 15 s by default; more often here so
#: even a short load is seen mid-way).
SCRAPE_INTERVAL_S = 2.0
#: The task the bot serves in this run (``--task``; any built-in name or TOML path), set once by :func:`main`.
TASK = load_task("travel")


@dataclass
class LoadResult:
    """One (policy, N) measurement."""

    policy: str
    chats: int
    messages: int
    replies: int
    lost: int
    turns_logged: int
    apologies: int
    p50_s: float
    p99_s: float
    wall_s: float
    during_training: bool = False
    #: threads the policy decoded with (None: a policy without the engine's thread control)
    threads: int | None = None
    #: how many times ``/metrics`` was scraped during the load, and Reverie's samples in the last scrape
    scrapes: int = 0
    metrics: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Replies per second over the whole run."""
        return self.replies / self.wall_s if self.wall_s else 0.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[min(998, max(0, round(q * 1000) - 1))]


def load_policy_for(
    name: str, model_cache_dir: Path | None, max_new_tokens: int, base_model: str = "smollm2", *, threads: int = 1
):
    """The prompted base policy on ``tiny`` (random) or ``smollm2`` (bundled), or ``checkpoint:PATH``: a trained
    checkpoint (the default policy, BC, ILQL, …) on ``base_model``; it decodes with ``threads``, as the bot's
    loader sets it (``bot.server.policy_loader``)."""
    from learning.policy import load_policy

    if name.startswith("checkpoint:"):
        source, base = name.split(":", 1)[1], base_model
    else:
        source, base = "base", name
    kwargs = {"cache_dir": model_cache_dir} if model_cache_dir is not None and base != "tiny" else {}
    return load_policy(
        source,
        task=load_task(TASK.reference),
        base_model=base,
        max_new_tokens=max_new_tokens,
        threads=threads,
        **kwargs,
    )


def policy_label(name: str, policy: object) -> str:
    """A short label: the policy's own name for a checkpoint (``bc``, ``ilql-utterance``), else the base model."""
    return f"{getattr(policy, 'name', 'checkpoint')} (checkpoint)" if name.startswith("checkpoint:") else name


async def run_load(
    policy_name: str, policy, chats: int, messages: int, progress: Progress, *, during_training: bool = False
) -> LoadResult:
    """Serve ``chats`` concurrent private chats of ``messages`` messages each; measure and count."""
    import httpx
    from sqlmodel import func, select

    from bot.adapters.telegram import run_telegram
    from bot.policy_holder import PolicyHolder
    from bot.server import Runtime, http_server
    from bot.settings import Settings
    from bot.web.metrics import BotMetrics, MeteredDialogueService
    from storage import Database, Store
    from storage.models import Turn
    from tests.fakes.ports import free_port
    from tests.fakes.telegram_api import FakeTelegramServer

    with tempfile.TemporaryDirectory(prefix="reverie-botload-") as tmp:
        database = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        await database.create_schema()
        store = Store(database)
        async with FakeTelegramServer() as server:
            settings = Settings(
                _env_file=None,
                telegram_token=server.token,
                telegram_base_url=server.base_url,
                http_host="127.0.0.1",
                http_port=free_port(),
            )
            holder = PolicyHolder(policy)
            task = load_task(TASK.reference)
            metrics = BotMetrics()
            # the process's real HTTP server, so /metrics is scraped as Prometheus would while the load runs
            service = MeteredDialogueService(
                metrics=metrics, store=store, policies=holder, task=task, settings=settings
            )
            runtime = Runtime(settings, store, task, holder, service, lambda source, version: policy, metrics)
            stop = asyncio.Event()
            http = contextlib.AsyncExitStack()  # the server stops with the load, or when the load fails
            await http.enter_async_context(http_server(runtime, stop))
            bot_task = asyncio.create_task(run_telegram(service, settings, stop, poll_timeout_s=5))
            await server.wait_for_call("getUpdates", timeout=60)
            scrapes: list[str] = []

            async def scrape_while_loaded() -> None:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}") as client:
                    while not stop.is_set():
                        scrapes.append((await client.get("/metrics")).text)
                        await asyncio.sleep(SCRAPE_INTERVAL_S)

            task_progress = progress.add_task(f"{policy_name} N={chats}", total=chats * messages)
            latencies: list[float] = []
            lost = 0
            apologies = 0

            async def one_chat(index: int) -> None:
                nonlocal lost, apologies
                user = USER_ID_BASE + index
                await server.send_command(user, user, "start")
                await server.next_message(user, timeout=REPLY_TIMEOUT_S)
                for number in range(messages):
                    started = time.perf_counter()
                    await server.send_text(user, user, f"Message {number} from chat {index}: a quiet beach trip?")
                    try:
                        reply = await server.next_message(user, timeout=REPLY_TIMEOUT_S)
                    except TimeoutError:
                        lost += 1
                    else:
                        latencies.append(time.perf_counter() - started)
                        apologies += "sorry" in reply["text"].lower()
                    progress.advance(task_progress)

            started = time.perf_counter()
            scraper = asyncio.create_task(scrape_while_loaded())
            await asyncio.gather(*(one_chat(i) for i in range(chats)))
            wall = time.perf_counter() - started
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}") as client:
                scrapes.append((await client.get("/metrics")).text)  # the last scrape sees the whole load
            stop.set()
            await scraper
            await bot_task
            await service.shutdown()
            await http.aclose()
            async with database.session() as session:
                turns_logged = (
                    await session.exec(select(func.count()).select_from(Turn).where(Turn.role == "user"))
                ).one()
        await database.dispose()
    progress.remove_task(task_progress)
    return LoadResult(
        policy=policy_name,
        chats=chats,
        messages=chats * messages,
        replies=len(latencies),
        lost=lost,
        turns_logged=int(turns_logged),
        apologies=apologies,
        p50_s=percentile(latencies, 0.5),
        p99_s=percentile(latencies, 0.99),
        wall_s=wall,
        during_training=during_training,
        threads=getattr(policy, "threads", None),
        scrapes=len(scrapes),
        metrics=reverie_lines(scrapes[-1]),
    )


def reverie_lines(exposition: str) -> list[str]:
    """The samples of Reverie's own metrics in one ``/metrics`` answer (no comments, no bucket lines)."""
    return [
        line
        for line in exposition.splitlines()
        if line.startswith("reverie_") and "_bucket{" not in line and not line.endswith("_created")
    ]


def rich_table(results: list[LoadResult]) -> Table:
    """The results for the terminal."""
    table = Table(title="Telegram bot load (fake Bot API, real PTB + DialogueService + SQLite)")
    columns = (
        "policy",
        "chats",
        "training",
        "messages",
        "lost",
        "turns logged",
        "apologies",
        "p50 s",
        "p99 s",
        "replies/s",
    )
    for column in columns:
        table.add_column(column, justify="right" if column != "policy" else "left")
    for r in results:
        lost = f"[red]{r.lost}[/red]" if r.lost else "0"
        logged = str(r.turns_logged) if r.turns_logged == r.messages else f"[red]{r.turns_logged}[/red]"
        table.add_row(
            r.policy,
            str(r.chats),
            "yes" if r.during_training else "no",
            str(r.messages),
            lost,
            logged,
            str(r.apologies),
            f"{r.p50_s:.3f}",
            f"{r.p99_s:.3f}",
            f"{r.throughput:.2f}",
        )
    return table


def markdown(results: list[LoadResult], command: str, args: argparse.Namespace) -> str:
    """A markdown table with the reproducing command and the machine."""
    quiet = (
        "quiet machine (declared by `--quiet-machine`; the background trainer, where shown, is the only other work)"
        if args.quiet_machine
        else "**shared machine: not quiet** (CPU shared with other work, so latencies are indicative)"
    )
    lines = [
        run_heading(command),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, decoding threads "
        f"{args.threads if args.threads is not None else 'as the bot (every CPU idle, half during training)'}: "
        f"{', '.join(sorted({str(r.threads) for r in results}))}, "
        f"max {args.max_new_tokens} new tokens, load average {args.load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end, {quiet}. "
        "Latency: user message injected into the fake Bot API → reply received by it (PTB polling, AIORateLimiter, "
        "DialogueService, SQLite, policy).",
        "",
        "| policy | chats | during training | messages | lost | turns logged | apologies | p50 s | p99 s | replies/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.chats} | {'yes' if r.during_training else 'no'} | {r.messages} | {r.lost} | "
            f"{r.turns_logged} | {r.apologies} | {r.p50_s:.3f} | {r.p99_s:.3f} | {r.throughput:.2f} |"
        )
    ratios = training_ratios(results)
    if ratios:
        lines.append("")
        lines += [f"- {label}: p50 during training / idle p50 = {ratio:.2f}×" for label, ratio in ratios]
    if results:
        shown = largest(results)
        quoted = [line for line in shown.metrics if line.startswith(QUOTED_METRICS)]
        lines += [
            "",
            f"`/metrics` of the process's HTTP server was scraped every {SCRAPE_INTERVAL_S:g} s during each load "
            f"({', '.join(str(r.scrapes) for r in results)} scrapes); the last scrape of {shown.policy} with "
            f"{shown.chats} chats{' during training' if shown.during_training else ''}:",
            "",
            "```",
            *quoted,
            "```",
        ]
    return "\n".join(lines) + "\n"


def training_ratios(results: list[LoadResult]) -> list[tuple[str, float]]:
    """``(policy at N chats, p50 during training ÷ idle p50)`` for every load measured both ways."""
    idle = {(r.policy, r.chats): r for r in results if not r.during_training}
    ratios = []
    for r in results:
        base = idle.get((r.policy, r.chats))
        if r.during_training and base is not None and base.p50_s > 0:
            ratios.append((f"{r.policy}, {r.chats} chats", r.p50_s / base.p50_s))
    return ratios


def summary(results: list[LoadResult], args: argparse.Namespace) -> dict[str, object]:
    """``bench/results/bot_load.json``: the rows the issue asks for, and the conditions they were measured in."""
    return {
        "quiet": bool(args.quiet_machine),
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "messages_per_chat": args.messages,
        "load_average_start": args.load_start,
        "rows": [
            {
                "policy": r.policy,
                "chats": r.chats,
                "during_training": r.during_training,
                "threads": r.threads,
                "p50_s": round(r.p50_s, 4),
                "p99_s": round(r.p99_s, 4),
                "lost": r.lost,
                "messages": r.messages,
                "turns_logged": r.turns_logged,
                "apologies": r.apologies,
                "replies_per_s": round(r.throughput, 3),
                "metrics_scrapes": r.scrapes,
            }
            for r in results
        ],
        "p50_training_over_idle": dict(training_ratios(results)),
        "metrics_last_scrape": largest(results).metrics if results else [],
    }


def largest(results: list[LoadResult]) -> LoadResult:
    """The load with the most messages (its last ``/metrics`` scrape is the one shown)."""
    return max(results, key=lambda r: (r.messages, not r.during_training))


#: The metric families the markdown quotes from the last scrape (the JSON keeps every sample).
QUOTED_METRICS = (
    "reverie_handled_total",
    "reverie_reply_latency_seconds_count",
    "reverie_reply_latency_seconds_sum",
    "reverie_errors_total",
    "reverie_active_policy_version",
)


async def load_series(
    label: str, policy: object, args: argparse.Namespace, progress: Progress, *, during_training: bool = False
) -> list[LoadResult]:
    """One measurement per number of concurrent chats."""
    results = []
    for chats in args.chats:
        result = await run_load(label, policy, chats, args.messages, progress, during_training=during_training)
        results.append(result)
        progress.console.print(
            f"{label} N={chats}{' (training)' if during_training else ''}: "
            f"p50 {result.p50_s:.3f} s, p99 {result.p99_s:.3f} s, "
            f"lost {result.lost}, turns {result.turns_logged}/{result.messages}"
        )
    return results


class RateColumn(ProgressColumn):
    """Messages answered per second."""

    def render(self, task: Task) -> Text:
        """The task's speed, or a dash before there is one."""
        return Text(f"{task.speed:.1f} msg/s" if task.speed else "- msg/s")


@contextlib.asynccontextmanager
async def training_in_background(base_model: str, workdir: Path) -> AsyncIterator[None]:
    """A real ``reverie train`` child started as the improvement loop starts it (``run_step``: niced and confined
    to the CPUs serving does not use), for the block's duration."""
    from bot.subprocesses import StepFailedError, reverie_command, run_step
    from imagine.simulated import generate_scripted_dialogues

    dialogues = workdir / "dialogues.jsonl"
    dialogues.write_text(
        "".join(json.dumps(d.to_dict()) + "\n" for d in generate_scripted_dialogues(TASK.reference, 400, 0))
    )
    command = reverie_command(
        "train",
        "--algo",
        "ilql",
        "--task",
        TASK.reference,
        "--dialogues",
        str(dialogues),
        "--steps",
        "100000",
        "--base-model",
        base_model,
        "--out",
        str(workdir / "candidate"),
        "--quiet",
    )
    log = workdir / "train.log"
    trainer = asyncio.create_task(run_step("train", command, log_path=log, time_limit_s=24 * 3600))
    await asyncio.sleep(20)  # past imports and model loading: the trainer is busy training
    if trainer.done():
        with contextlib.suppress(StepFailedError):
            trainer.result()
        raise RuntimeError(f"the background trainer stopped early; see {log}")
    try:
        yield
    finally:
        trainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trainer


async def main_async(args: argparse.Namespace) -> list[LoadResult]:
    """Every (policy, N) in turn; with ``--during-training`` each N again while a trainer runs."""
    from bot.subprocesses import idle_serving_threads, serving_threads

    console = Console(width=max(Console().width, 110))
    results: list[LoadResult] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        for policy_name in args.policies:
            policy = load_policy_for(
                policy_name,
                args.model_cache_dir,
                args.max_new_tokens,
                args.checkpoint_base_model,
                threads=idle_serving_threads(),
            )
            label = policy_label(policy_name, policy)
            try:
                results += await load_series(label, policy, args, progress)
                if args.during_training:
                    with tempfile.TemporaryDirectory() as workdir:
                        async with training_in_background(args.train_base_model, Path(workdir)):
                            policy.threads = serving_threads()  # as the improvement loop does (bot.improve)
                            try:
                                results += await load_series(label, policy, args, progress, during_training=True)
                            finally:
                                policy.threads = idle_serving_threads()
            finally:
                policy.close()
    console.print(rich_table(results))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny policy only")
    parser.add_argument("--task", default="travel", help="a built-in task's name or the path of a task TOML")
    parser.add_argument("--chats", default="1,8,32", help="comma-separated numbers of concurrent chats")
    parser.add_argument("--messages", type=int, default=3, help="messages per chat (each waits for its reply)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="reply length limit (the bot's default: 96)")
    parser.add_argument(
        "--policies",
        default="tiny,smollm2",
        help="comma-separated: tiny, smollm2 (prompted base models) or checkpoint:PATH (a trained policy)",
    )
    parser.add_argument("--checkpoint-base-model", default="smollm2", help="base model of checkpoint:PATH policies")
    parser.add_argument(
        "--quiet-machine", action="store_true", help="declare that nothing else runs (recorded in the table/json)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON summary goes")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "reverie" / "models")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="fixed decoding threads (TORCH_THREADS); default as the bot: every CPU idle, half during training",
    )
    parser.add_argument(
        "--during-training", action="store_true", help="repeat each load while a `reverie train` child runs"
    )
    parser.add_argument(
        "--train-base-model", default="smollm2", help="base model of the background trainer (as the bot trains)"
    )
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file to append to")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.chats = [int(n) for n in str(args.chats).split(",") if n.strip()]
    args.policies = ["tiny"] if args.quick else [p.strip() for p in args.policies.split(",") if p.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status 1 when a message was lost or a turn not logged."""
    args = parse_args(argv)
    global TASK
    TASK = load_task(args.task)
    import torch

    torch.set_num_threads(1)  # this thread only loads; the policy's worker decodes with --threads
    if args.threads is not None:  # fixed, as TORCH_THREADS fixes the bot's (and what run_step keeps for serving)
        os.environ["TORCH_THREADS"] = str(args.threads)
    args.load_start = os.getloadavg()[0]
    logging.basicConfig(level=logging.WARNING)
    # Policy timeouts are counted as apologies; their tracebacks would bury the table.
    for noisy in ("bot.service", "learning.policy"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    results = asyncio.run(main_async(args))
    command = reproduce_command(__file__, argv)
    if not args.no_write:
        write_section(SECTION, markdown(results, command.strip(), args), path=args.benchmarks)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summary(results, args), indent=2) + "\n", encoding="utf-8")
    else:
        print(json.dumps(summary(results, args), indent=2))
    return 0 if all(r.lost == 0 and r.turns_logged == r.messages for r in results) else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A policy's batcher thread may still be generating replies the service gave up on (timeouts); torch aborts
    # the interpreter if it is torn down under a running native thread, so leave without tearing down.
    os._exit(status)
