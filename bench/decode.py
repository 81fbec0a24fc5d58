"""Benchmark: reply tokens/s — HF ``generate`` vs our decoding (plain, token-level ILQL, utterance reranking),
and aggregate tokens/s at 1, 4 and 8 concurrent chats through the policy's micro-batcher.

Every row generates exactly ``--tokens`` tokens per reply (end-of-turn disabled) under bf16 autocast, sampling
with top-k 20 and temperature 0.7, so rows differ only by the decoding method. ILQL heads are freshly
initialised: speed does not depend on what they learned. Token-level ILQL with ``value_features="base"``
runs the adapter-free base model in lockstep (its own KV cache); ``policy`` features cost no extra forward.

Usage: ``.venv/bin/python bench/decode.py [--quick] [--tokens 32] [--no-append]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.benchmarks_md import machine, reproduce_command, run_heading, write_section  # noqa: E402
from imagine.task import load_task  # noqa: E402
from learning.base_model import load_base_model  # noqa: E402
from learning.decoding import DecodeConfig, decode, rerank_utterances  # noqa: E402
from learning.ilql import ILQLConfig, ValueHeads  # noqa: E402
from learning.interface import Message  # noqa: E402
from learning.policy import LearnedPolicy  # noqa: E402
from learning.trainer import autocast  # noqa: E402

NEVER = -1  # an end-of-turn id no token has: every reply runs to the token budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model")
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_model = args.base_model or ("tiny" if args.quick else "smollm2")
    task = load_task("travel")
    base = load_base_model(base_model)
    value_model = load_base_model(base_model).model
    model, tokenizer = base.model, base.tokenizer
    d, vocab = model.get_output_embeddings().weight.shape[1], model.get_output_embeddings().weight.shape[0]
    token_heads = ValueHeads(d, vocab, ILQLConfig(level="token")).eval()
    utterance_heads = ValueHeads(d, vocab, ILQLConfig(level="utterance")).eval()
    history = [
        Message("agent", task.opening_line),
        Message("user", "A weekend away with my partner, we love good food."),
    ]
    policy = LearnedPolicy(model, tokenizer, task, name="bench", algorithm="bc")
    prompt = policy.prompt_ids(history)
    n = args.tokens
    sampling = DecodeConfig(max_new_tokens=n, temperature=0.7, top_k=20)
    generator = torch.Generator().manual_seed(0)
    rows: list[tuple[str, float]] = []

    def timed(label: str, run: Callable[[], object], tokens: int) -> None:
        run()  # warm-up
        started = time.perf_counter()
        run()
        rows.append((label, tokens / (time.perf_counter() - started)))

    ids = torch.tensor([prompt])

    def hf_generate() -> None:
        with torch.inference_mode(), autocast(True):
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                top_k=20,
                temperature=0.7,
                pad_token_id=tokenizer.pad_token_id,
            )

    timed("HF generate, 1 stream", hf_generate, n)
    timed(
        "our decode, β = 0 (BC/FBC), 1 stream",
        lambda: decode(model, [prompt], end_id=NEVER, pad_id=0, config=sampling, generator=generator),
        n,
    )
    token_config = DecodeConfig(max_new_tokens=n, temperature=0.7, top_k=20, beta=4.0)
    timed(
        "our ILQL token-level, policy features, 1 stream",
        lambda: decode(model, [prompt], end_id=NEVER, pad_id=0, config=token_config, heads=token_heads),
        n,
    )
    timed(
        "our ILQL token-level, base features (default), 1 stream",
        lambda: decode(
            model, [prompt], end_id=NEVER, pad_id=0, config=token_config, heads=token_heads, value_model=value_model
        ),
        n,
    )
    utterance_config = DecodeConfig(max_new_tokens=n, temperature=0.7, top_k=20, candidates=args.candidates)
    timed(
        f"our ILQL utterance-level (K={args.candidates}), 1 stream",
        lambda: rerank_utterances(
            model,
            [prompt],
            end_id=NEVER,
            pad_id=0,
            config=utterance_config,
            heads=utterance_heads,
            value_model=value_model,
        ),
        n,
    )
    single = rows[0][1]
    for label, heads, beta in (("β = 0", None, 0.0), ("ILQL token-level", token_heads, 4.0)):
        chat_policy = LearnedPolicy(
            model,
            tokenizer,
            task,
            name="bench",
            algorithm="bench",
            heads=heads,
            value_model=value_model if heads is not None else None,
            decode_config=DecodeConfig(max_new_tokens=n, temperature=0.7, top_k=20, beta=beta),
        )
        chat_policy._end_id = NEVER
        for chats in (1, 4, 8):

            async def concurrent(chats: int = chats, chat_policy: LearnedPolicy = chat_policy) -> None:
                await asyncio.gather(*(chat_policy.respond(history) for _ in range(chats)))

            timed(
                f"{label}: {chats} concurrent chats (micro-batched)", lambda c=concurrent: asyncio.run(c()), n * chats
            )
        chat_policy.close()

    console = Console()
    table = Table(title=f"Decoding throughput ({base_model}, {n} tokens per reply, bf16 autocast, CPU)")
    table.add_column("method")
    table.add_column("reply tokens/s")
    table.add_column("× HF generate (1 stream)")
    for label, rate in rows:
        table.add_row(label, f"{rate:.1f}", f"{rate / single:.2f}×")
    console.print(table)
    if not args.no_append:
        lines = [
            run_heading(reproduce_command(__file__)),
            "",
            f"{machine()}, torch {torch.__version__}, {args.threads} threads, load average "
            f"{os.getloadavg()[0]:.1f} at the end, {n} tokens per reply, top-k 20, temperature 0.7.",
            "",
            "| method | reply tokens/s | × HF generate (1 stream) |",
            "|---|---|---|",
            *(f"| {label} | {rate:.1f} | {rate / single:.2f}× |" for label, rate in rows),
        ]
        write_section(f"Decoding throughput ({base_model})", "\n".join(lines))


if __name__ == "__main__":
    main()
