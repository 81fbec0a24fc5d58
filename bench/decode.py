"""Benchmark: reply tokens/s per policy kind vs HF ``generate``, one stream and 1/4/8/16 concurrent chats.

Every reply is exactly ``--tokens`` tokens (end-of-turn disabled), top-k 20, temperature 0.7, so rows differ
only by the decoding method. The reference is HF ``generate`` on the same model, one stream: the faster of
fp32 and bf16 weights (both without autocast, which re-casts every weight on every step and is slower still;
that variant is printed for comparison), each the mean of a run at the start and one at the end, since this
machine's speed drifts by about ±10 % over minutes. Concurrent chats go through the policy's real ``respond`` (the
continuous batcher) with a distinct history each, and are compared with HF ``generate`` batched over the same
histories (left-padded); one chat is the single stream (the same ``respond`` call), so it has no row of its own.
ILQL heads are freshly initialised: speed does not depend on what they learned.

Policy kinds: the prompted base model, BC/FBC and the default RL policy (a LoRA actor, merged) decode the same
way — plain sampling through the policy trunk — so one row stands for all of them ("default"). Token-level ILQL
adds ``β·(Q̄ − V)`` over the top-k (value features from the policy trunk, or from the base trunk decoding in
lockstep); utterance-level ILQL samples K replies per prompt and reranks them.

Every timed reply of ours encodes its whole prompt except the conversation start (system prompt and opening
line) that a policy pins at load, as the serving bot does; the same rows with nothing cached at all ("cold",
measured after the second-turn rows) show what the pin is worth. Also measured: a conversation's second turn with
and without the prefix cache (its first turn's keys/values).

Each group of rows (the HF references, then each policy kind) runs in a fresh process, and every reply of ours goes
through ``respond`` — the batcher thread, the one thread that decodes in the serving bot, with ``--threads``; the
main thread, which only loads, keeps one thread, as the bot's loader does. GNU OpenMP keeps each thread's pool for
good and stops spinning between parallel regions once its pools hold more threads than there are CPUs: with HF's
or a loader's team of two beside the batcher's, one-row steps ran ~1.5× slower (18.4 vs 28.0 tok/s).

Writes the table (with whether the machine was declared quiet) to BENCHMARKS.md and a summary to
``bench/results/decode.json``, unless ``--no-append``.

Usage: ``.venv/bin/python bench/decode.py --tokens 40 --threads 2 --quiet-machine``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from preamble import ROOT
from rich.console import Console
from rich.table import Table

from bench.benchmarks_md import machine, reproduce_command, run_heading, write_section
from imagine.task import TaskSpec, load_task
from learning.base_model import load_base_model
from learning.decoding import DecodeConfig, left_pad
from learning.ilql import ILQLConfig, ValueHeads
from learning.interface import History, Message
from learning.policy import LearnedPolicy

NEVER = -1  # an end-of-turn id no token has: every reply runs to the token budget
RESULTS = ROOT / "bench" / "results" / "decode.json"
USER_LINES = [
    "A weekend away with my partner, we love good food.",
    "I want somewhere quiet with long walks and old churches.",
    "We are a family of four, the kids love beaches.",
    "Something cheap in a big city, I like museums.",
    "My friends and I want an adventure, maybe hiking.",
    "I like jazz and late dinners, not too busy.",
    "A slow week by a lake, reading and swimming.",
    "We love history and castles, budget is medium.",
]


def histories(count: int, task: TaskSpec) -> list[History]:
    """``count`` distinct two-message histories (so chats share only the system prompt, as real ones do); the user
    lines are the same free-form text whatever the task, so runs on different tasks differ only by the prompt."""
    return [
        [Message("agent", task.opening_line), Message("user", f"{USER_LINES[i % len(USER_LINES)]} (chat {i})")]
        for i in range(count)
    ]


class Bench:
    """Runs every measurement on one model and keeps the rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = args.tokens
        base = load_base_model(args.base_model)
        self.model, self.tokenizer = base.model, base.tokenizer
        self.task = load_task(args.task)
        self.rows: list[dict[str, Any]] = []
        self.console = Console()

    def timed(self, run: Callable[[], object]) -> float:
        """Seconds of the best of ``--repeats`` runs after one warm-up."""
        run()
        best = float("inf")
        for _ in range(self.args.repeats):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        return best

    def add(self, key: str, label: str, streams: int, seconds: float, **extra: Any) -> float:
        rate = streams * self.n / seconds
        self.rows.append({"key": key, "method": label, "streams": streams, "tokens_per_s": rate, **extra})
        self.console.print(f"{label}: {rate:.1f} tok/s")
        return rate

    # --- HF generate --------------------------------------------------------------------------------------

    def hf_generate(self, model: torch.nn.Module, count: int, *, use_autocast: bool = False) -> Callable[[], None]:
        prompts = [self.prompt(h) for h in histories(count, self.task)]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)

        def run() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=self.n,
                    min_new_tokens=self.n,
                    do_sample=True,
                    top_k=20,
                    temperature=0.7,
                    pad_token_id=self.tokenizer.pad_token_id,
                )

        return run

    def prompt(self, history: History) -> list[int]:
        policy = LearnedPolicy(self.model, self.tokenizer, self.task, name="p", algorithm="p", engine=False)
        return policy.prompt_ids(history)

    # --- ours ---------------------------------------------------------------------------------------------

    def policy(self, *, heads: ValueHeads | None = None, value_model: Any = None, **config: Any) -> LearnedPolicy:
        decode_config = DecodeConfig(max_new_tokens=self.n, temperature=0.7, top_k=20, **config)
        policy = LearnedPolicy(
            self.model,
            self.tokenizer,
            self.task,
            name="bench",
            algorithm="bench",
            heads=heads,
            value_model=value_model,
            decode_config=decode_config,
            max_batch=max(self.args.chats),
            threads=self.args.threads,
        )
        assert policy.engine is not None, "the engine does not support this model"
        policy._end_id = NEVER
        policy.engine.end_id = NEVER
        return policy

    def one_stream(self, policy: LearnedPolicy) -> Callable[[], None]:
        history = histories(1, self.task)[0]

        def run() -> None:
            assert policy.engine is not None
            # the timed run encodes its prompt as generate does, but for the conversation start the policy
            # pinned at load (after --cold: all of it)
            policy.engine.prefix.clear()
            policy.engine.value_prefix.clear()
            asyncio.run(policy.respond(history))

        return run

    def chats(self, policy: LearnedPolicy, count: int) -> Callable[[], None]:
        chat_histories = histories(count, self.task)

        async def concurrent() -> None:
            await asyncio.gather(*(policy.respond(h) for h in chat_histories))

        def run() -> None:
            assert policy.engine is not None
            policy.engine.prefix.clear()
            policy.engine.value_prefix.clear()
            asyncio.run(concurrent())

        return run

    def second_turn(self, policy: LearnedPolicy) -> tuple[float, float]:
        """Seconds for a conversation's second reply with the first turn cached, and without any cache."""
        assert policy.engine is not None
        first = histories(1, self.task)[0]
        reply = asyncio.run(policy.respond(first))
        second = [*first, Message("agent", reply), Message("user", "Yes, and we like wine too. Any idea?")]
        cached = self.timed(lambda: asyncio.run(policy.respond(second)))  # the warm-up stores the second turn too
        max_bytes = policy.engine.prefix.max_bytes
        policy.engine.prefix.clear(pinned=True)  # nothing cached, not even the conversation start
        policy.engine.prefix.max_bytes = 0
        uncached = self.timed(lambda: asyncio.run(policy.respond(second)))
        policy.engine.prefix.max_bytes = max_bytes
        return cached, uncached

    def single_stream_rows(self, key_suffix: str = "", label_suffix: str = "") -> tuple[float, float, Any]:
        """HF ``generate``, one stream, fp32 then bf16 weights: both rates and the bf16 model."""
        fp32 = self.add(
            f"hf_fp32_1{key_suffix}",
            f"HF generate, fp32 weights, 1 stream{label_suffix}",
            1,
            self.timed(self.hf_generate(self.model, 1)),
        )
        bf16_model = load_base_model(self.args.base_model).model.to(torch.bfloat16)
        bf16 = self.add(
            f"hf_bf16_1{key_suffix}",
            f"HF generate, bf16 weights, 1 stream{label_suffix}",
            1,
            self.timed(self.hf_generate(bf16_model, 1)),
        )
        return fp32, bf16, bf16_model

    def closing_reference_rows(self) -> list[dict[str, Any]]:
        """The single-stream references again: the run's end (see :func:`run_all`)."""
        self.single_stream_rows("_end", " (at the end)")
        return self.rows

    def reference_rows(self) -> list[dict[str, Any]]:
        """HF ``generate``: fp32 and bf16 weights, bf16 autocast, and batched over 4/8/16 histories (the faster
        weights of the single stream)."""
        fp32, bf16, bf16_model = self.single_stream_rows()
        reference_model = self.model if fp32 >= bf16 else bf16_model
        self.add(
            "hf_autocast_1",
            "HF generate, fp32 weights + bf16 autocast, 1 stream",
            1,
            self.timed(self.hf_generate(self.model, 1, use_autocast=True)),
        )
        for count in self.args.chats:
            if count > 1:
                self.add(
                    f"hf_batched_{count}",
                    f"HF generate, batched, {count} streams",
                    count,
                    self.timed(self.hf_generate(reference_model, count)),
                )
        return self.rows

    def kind_rows(self, key: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """One policy kind's rows (1 stream, then concurrent chats) and, for the default, the second-turn times."""
        args = self.args
        d = self.model.get_output_embeddings().weight.shape[1]
        vocab = self.model.get_output_embeddings().weight.shape[0]

        def value_model() -> Any:
            return load_base_model(args.base_model).model

        kinds: dict[str, tuple[str, Callable[[], LearnedPolicy], list[int]]] = {
            "default": ("default / BC / FBC / base: plain sampling", lambda: self.policy(), args.chats),
            "token_ilql_policy_features": (
                "token-level ILQL, policy features",
                lambda: self.policy(heads=ValueHeads(d, vocab, ILQLConfig(level="token")).eval(), beta=4.0),
                [1, 8],
            ),
            "token_ilql_base_features": (
                "token-level ILQL, base features (lockstep value trunk)",
                lambda: self.policy(
                    heads=ValueHeads(d, vocab, ILQLConfig(level="token")).eval(), value_model=value_model(), beta=4.0
                ),
                [1, 8],
            ),
            "rerank": (
                f"utterance-level ILQL, K = {args.candidates} reranked (base features)",
                lambda: self.policy(
                    heads=ValueHeads(d, vocab, ILQLConfig(level="utterance")).eval(),
                    value_model=value_model(),
                    candidates=args.candidates,
                ),
                [1, 4],
            ),
        }
        label, build, chat_counts = kinds[key]
        row_key = f"rerank_k{args.candidates}" if key == "rerank" else key
        turn: dict[str, float] = {}
        policy = build()
        try:
            self.add(f"{row_key}_1_stream", f"{label}, 1 stream", 1, self.timed(self.one_stream(policy)))
            for count in (c for c in chat_counts if c > 1):  # one chat is the single stream's path and row
                self.add(
                    f"{row_key}_{count}_chats_aggregate",
                    f"{label}, {count} concurrent chats",
                    count,
                    self.timed(self.chats(policy, count)),
                    peak_rows=policy.batcher.peak_rows if hasattr(policy.batcher, "peak_rows") else None,
                )
            if key == "default":
                cached, uncached = self.second_turn(policy)
                turn = {"cached_s": cached, "uncached_s": uncached}
                self.console.print(f"second turn: {cached:.2f} s cached, {uncached:.2f} s uncached")
                # the pinned conversation start is gone now: the same rows with every prompt token encoded
                self.add(
                    f"{row_key}_1_stream_cold",
                    f"{label}, 1 stream, nothing cached",
                    1,
                    self.timed(self.one_stream(policy)),
                )
                for count in (c for c in chat_counts if c > 1):
                    self.add(
                        f"{row_key}_{count}_chats_cold",
                        f"{label}, {count} concurrent chats, nothing cached",
                        count,
                        self.timed(self.chats(policy, count)),
                    )
        finally:
            policy.close()
        return self.rows, turn


KIND_ORDER = ("default", "token_ilql_policy_features", "token_ilql_base_features", "rerank")


def measure(args: argparse.Namespace, group: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One group of rows in this (fresh) process: ``reference`` or a policy kind.

    HF ``generate`` computes on this main thread with ``--threads``; a policy decodes on its worker thread with
    ``--threads`` while this thread, which only loads, keeps one — as the bot's loader does (see
    ``LearnedPolicy.threads``)."""
    torch.set_num_threads(args.threads if group.startswith("reference") else 1)
    bench = Bench(args)
    if group == "reference":
        return bench.reference_rows(), {}
    if group == "reference_end":
        return bench.closing_reference_rows(), {}
    return bench.kind_rows(group)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every group in its own spawned process, one after another; the summary with ratios."""
    load_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    turn: dict[str, float] = {}
    # the reference once more at the end: this machine's speed drifts by ±10 % over minutes, so every ratio is
    # taken against the mean of the HF runs that bracket it
    groups = ["reference", *(kind for kind in KIND_ORDER if kind in args.kinds), "reference_end"]
    for group in groups:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            group_rows, group_turn = pool.submit(measure, args, group).result()
        rows += group_rows
        turn = turn or group_turn
    by_key = {row["key"]: row for row in rows}
    fp32, bf16 = (
        (by_key[f"hf_{weights}_1"]["tokens_per_s"] + by_key[f"hf_{weights}_1_end"]["tokens_per_s"]) / 2
        for weights in ("fp32", "bf16")
    )
    reference = max(fp32, bf16)
    for row in rows:
        row["x_hf_generate_1_stream"] = row["tokens_per_s"] / reference
        batched = by_key.get(f"hf_batched_{row['streams']}")
        if batched is not None and not row["key"].startswith("hf_"):
            row["x_hf_batched_same_streams"] = row["tokens_per_s"] / batched["tokens_per_s"]
    return {
        "quiet": bool(args.quiet_machine),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "tokens_per_reply": args.tokens,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "reference": {
            "tokens_per_s": reference,
            "variant": "fp32 weights" if fp32 >= bf16 else "bf16 weights",
            "measured": "mean of the first and the last group's runs",
        },
        "ratios": {
            row["key"]: round(row["x_hf_generate_1_stream"], 3) for row in rows if not row["key"].startswith("hf_")
        },
        "second_turn": turn,
        "rows": rows,
    }


def markdown(summary: dict[str, Any], command: str) -> str:
    """The run's block for BENCHMARKS.md."""
    quiet = "quiet machine (declared by `--quiet-machine`)" if summary["quiet"] else "**shared machine: not quiet**"
    lines = [
        run_heading(command),
        "",
        f"{summary['machine']}, torch {summary['torch']}, {summary['threads']} threads, {quiet}, load average "
        f"{summary['load_average_start']:.1f} at the start and {summary['load_average_end']:.1f} at the end; "
        f"{summary['tokens_per_reply']} tokens per reply, top-k 20, temperature 0.7. Reference: HF generate, one "
        f"stream, {summary['reference']['variant']} ({summary['reference']['tokens_per_s']:.1f} tok/s, the mean of its "
        "runs at the start and at the end).",
        "",
        "| method | streams | reply tokens/s | × HF generate (1 stream) | × HF generate batched (same streams) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        same = row.get("x_hf_batched_same_streams")
        lines.append(
            f"| {row['method']} | {row['streams']} | {row['tokens_per_s']:.1f} | {row['x_hf_generate_1_stream']:.2f}× "
            f"| {f'{same:.2f}×' if same is not None else '—'} |"
        )
    turn = summary.get("second_turn") or {}
    if turn:
        lines += [
            "",
            f"A conversation's second turn (default policy): {turn['cached_s']:.2f} s with its first turn's keys and "
            f"values reused, {turn['uncached_s']:.2f} s re-encoding the whole history.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model")
    parser.add_argument("--task", default="travel", help="a built-in task's name or the path of a task TOML")
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chats", default="1,4,8,16", help="numbers of concurrent chats")
    parser.add_argument(
        "--kinds",
        default="default,token_ilql_policy_features,token_ilql_base_features,rerank",
        help="policy kinds to measure (comma-separated)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row after the warm-up (best kept)")
    parser.add_argument(
        "--quiet-machine", action="store_true", help="declare that nothing else runs (recorded in the table/json)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON summary goes")
    parser.add_argument("--no-append", action="store_true", help="print only: no BENCHMARKS.md, no JSON")
    args = parser.parse_args()
    args.chats = [int(c) for c in args.chats.split(",") if c.strip()]
    args.kinds = {k.strip() for k in args.kinds.split(",") if k.strip()}
    args.base_model = args.base_model or ("tiny" if args.quick else "smollm2")
    summary = run_all(args)
    table = Table(title=f"Decoding throughput ({args.base_model}, {args.tokens} tokens per reply)")
    for column in ("method", "streams", "tok/s", "× HF 1 stream", "× HF batched"):
        table.add_column(column)
    for row in summary["rows"]:
        same = row.get("x_hf_batched_same_streams")
        table.add_row(
            row["method"],
            str(row["streams"]),
            f"{row['tokens_per_s']:.1f}",
            f"{row['x_hf_generate_1_stream']:.2f}×",
            f"{same:.2f}×" if same is not None else "—",
        )
    Console().print(table)
    if not args.no_append:
        write_section(f"Decoding throughput ({args.base_model})", markdown(summary, reproduce_command(__file__)))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    else:
        print(json.dumps(summary["ratios"], indent=2))


if __name__ == "__main__":
    main()
