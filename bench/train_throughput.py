"""Benchmark: training tokens/s and peak memory — plain LoRA SFT vs our BC vs our ILQL (factorized / full heads).

Every row trains the same LoRA (r=8, attention projections) on the same batches of scripted travel dialogues
under bf16 autocast, each in its own process so peak RSS is its own:

* ``plain LoRA SFT`` — ``model(input_ids, labels=…)`` of the HF model: logits over every position;
* ``our BC`` — the λ_bc term alone, logits only at agent (action) tokens;
* ``our ILQL (joint)`` — the paper's one-stage loss, BC + L_Q + L_V + λ_cql·L_CQL, factorized Q heads;
* ``ILQL, full-vocabulary heads`` — the same with ``d → 2d → |V|`` Q heads (trlx layout);
* ``our ILQL (staged)`` — what ``reverie train`` runs after BC: one forward pass for features, then value
  head steps; tokens/s counts the dialogue tokens covered per second of (forward + head steps).

Usage: ``.venv/bin/python bench/train_throughput.py [--quick] [--steps 6] [--batch-size 4] [--no-append]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.benchmarks_md import machine, reproduce_command, run_heading, write_section  # noqa: E402

ROWS = {
    "sft": "plain LoRA SFT (HF loss)",
    "bc": "our BC",
    "ilql": "our ILQL (joint, factorized heads)",
    "ilql-full": "ILQL, full-vocabulary heads",
    "ilql-staged": "our ILQL (staged: features + value heads)",
}


def measure(row: str, base_model: str, steps: int, batch_size: int, threads: int) -> dict[str, float]:
    """Train ``steps`` timed steps (after one warm-up) of one row; returns tokens/s and peak RSS."""
    torch.set_num_threads(threads)
    from imagine.simulated import generate_scripted_dialogues
    from imagine.task import load_task
    from learning.base_model import load_base_model
    from learning.dataset import collate, encode_records, return_range
    from learning.ilql import ILQLConfig, ValueHeads
    from learning.lora import attach_lora, output_embedding
    from learning.trainer import TrainConfig, _policy_loss, autocast, build_feature_table, value_step_loss

    task = load_task("travel")
    base = load_base_model(base_model)
    records = generate_scripted_dialogues("travel", batch_size * (steps + 1), seed=0)
    items, _ = encode_records(records, base.tokenizer, task)
    returns = return_range(items)
    model = attach_lora(base.model)
    embedding = output_embedding(model).detach()
    d, vocab = embedding.shape[1], embedding.shape[0]
    head_type = "full" if row == "ilql-full" else "factorized"
    level = "utterance" if row == "ilql-staged" else "token"
    heads = ValueHeads(d, vocab, ILQLConfig(level=level, head_type=head_type)) if row.startswith("ilql") else None
    config = TrainConfig(base_model=base_model, ilql=ILQLConfig(level=level, head_type=head_type))
    params = [p for p in model.parameters() if p.requires_grad] + (heads.trainable_parameters() if heads else [])
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = [
        collate(items[i : i + batch_size], base.tokenizer.pad_token_id) for i in range(0, len(items), batch_size)
    ]
    result: dict[str, float] = {}
    if row == "ilql-staged":
        started = time.perf_counter()
        with model.disable_adapter():
            table = build_feature_table(
                model,
                items,
                [1.0] * len(items),
                level=level,
                pad_id=base.tokenizer.pad_token_id,
                question_ids=set(),
                bf16=True,
            )
        value_optimizer = torch.optim.AdamW(heads.trainable_parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        head_steps = 50  # per pass over the data, as many as reverie train spends per epoch of features
        for _ in range(head_steps):
            rows = torch.multinomial(table.weights, 256, replacement=True, generator=generator)
            loss = value_step_loss(heads, table, rows, embedding, returns).loss
            loss.backward()
            value_optimizer.step()
            value_optimizer.zero_grad()
            heads.update_targets()
        seconds = time.perf_counter() - started
        tokens = sum(len(i) for i in items)
    else:
        tokens, seconds = 0, 0.0
        for index, batch in enumerate(batches[: steps + 1]):
            started = time.perf_counter()
            with autocast(True):
                if row == "sft":
                    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
                    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
                else:
                    loss, _ = _policy_loss(model, batch, embedding, heads, config, returns)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if heads is not None:
                heads.update_targets()
            if index > 0:  # the first step warms up kernels and allocators
                seconds += time.perf_counter() - started
                tokens += batch.num_tokens
    result["tokens_per_s"] = tokens / seconds
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if heads is not None:
        result["heads_parameters"] = heads.parameter_count()
        result["heads_mb"] = heads.size_bytes() / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model")
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    base_model = args.base_model or ("tiny" if args.quick else "smollm2")
    if args.one:
        print(json.dumps(measure(args.one, base_model, args.steps, args.batch_size, args.threads)))
        return
    console = Console()
    results: dict[str, dict[str, float]] = {}
    for row in args.rows.split(","):
        command = [sys.executable, __file__, "--one", row, "--base-model", base_model, "--steps", str(args.steps)]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        with console.status(f"measuring {ROWS[row]}…"):
            output = subprocess.run(command, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            console.print(f"[red]{row} failed:[/red] {output.stderr[-2000:]}")
            continue
        results[row] = json.loads(output.stdout.strip().splitlines()[-1])
    reference = results.get("sft", {}).get("tokens_per_s")
    table = Table(title=f"Training throughput ({base_model}, batch {args.batch_size}, bf16 autocast, CPU)")
    for column in ("method", "tokens/s", "× plain SFT", "peak RSS MB", "heads params", "heads MB"):
        table.add_column(column)
    rows = []
    for row, result in results.items():
        ratio = f"{result['tokens_per_s'] / reference:.2f}×" if reference else "–"
        cells = (
            ROWS[row],
            f"{result['tokens_per_s']:.0f}",
            ratio,
            f"{result['peak_rss_mb']:.0f}",
            f"{result['heads_parameters'] / 1e6:.2f} M" if "heads_parameters" in result else "–",
            f"{result['heads_mb']:.1f}" if "heads_mb" in result else "–",
        )
        rows.append(cells)
        table.add_row(*cells)
    console.print(table)
    if not args.no_append:
        lines = [
            run_heading(reproduce_command(__file__)),
            "",
            f"{machine()}, torch {torch.__version__}, {args.threads} threads, load average "
            f"{os.getloadavg()[0]:.1f} at the end, {args.steps} timed steps after one warm-up, batch "
            f"{args.batch_size} scripted travel dialogues, LoRA r=8 on q/k/v/o.",
            "",
            "| method | tokens/s | × plain SFT | peak RSS MB | heads params | heads MB |",
            "|---|---|---|---|---|---|",
            *(f"| {' | '.join(r)} |" for r in rows),
        ]
        write_section(f"Training throughput ({base_model})", "\n".join(lines))


if __name__ == "__main__":
    main()
