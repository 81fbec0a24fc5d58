"""Benchmark: imitation training speed — plain HF LoRA SFT vs Reverie's split-trunk training, same dialogues.

Every row trains on the same batches of scripted travel dialogues, each in its own process (peak RSS is its own):

* ``plain LoRA SFT`` — peft LoRA (r=16, attention + MLP) on every layer, ``model(input_ids, labels=…)`` with the
  labels masked to the agent's tokens: the whole model forward and backward, logits at every position;
* ``plain LoRA SFT, bf16 autocast`` — the same under ``torch.autocast(bfloat16)``;
* ``ours: top-4 LoRA on cached layers`` — LoRA on the top 4 of 30 layers only, the frozen lower layers' output
  computed once per dialogue (``learning.split_trunk.LowerStates``), the shared system-prompt prefix computed
  once per batch, logits only at action tokens, fp32;
* ``ours, bf16 autocast`` — the same under bf16 autocast: what ``reverie train`` runs where bf16 is native (CUDA,
  CPUs with AMX or AVX512-BF16, ``learning.devices.native_bf16``);
* ``ours: critic step`` — the per-turn critic of ``critic-awr`` (its own upper-layer copy, two scalar heads).

Steady-state rates exclude the one-time lower pass, which is timed separately and then amortised over
``--epochs`` passes over the data (the ``amortised`` column) — the honest comparison for a whole run.

Usage: ``.venv/bin/python bench/train_throughput.py [--quick] [--steps 5] [--batch-size 16] [--no-append]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from preamble import ROOT  # noqa: F401 (before the project imports: the root importable, HF offline)
from rich.console import Console
from rich.table import Table

from bench.benchmarks_md import machine, reproduce_command, run_heading, write_section

ROWS = {
    "sft": "plain LoRA SFT (HF loss, every layer)",
    "sft-bf16": "plain LoRA SFT, bf16 autocast",
    "ours": "ours: top-4 LoRA on cached layers",
    "ours-bf16": "ours, bf16 autocast (the trainer's default where bf16 is native)",
    "critic": "ours: critic step (critic-awr)",
}


def measure(
    row: str, base_model: str, steps: int, batch_size: int, threads: int, task_ref: str = "travel"
) -> dict[str, float]:
    """Time ``steps`` training steps (after one warm-up) of one row: dialogues/s, tokens/s, peak RSS."""
    torch.set_num_threads(threads)
    from learning.devices import native_bf16

    native_bf16(torch.device("cpu"))  # sets AMX tiles up where the CPU has them, as the trainer does
    from imagine.simulated import generate_scripted_dialogues
    from imagine.task import load_task
    from learning.base_model import load_base_model
    from learning.dataset import collate, encode_records
    from learning.lora import attach_lora, output_embedding
    from learning.split_trunk import LowerStates, UpperStack
    from learning.training import TrainConfig
    from learning.training.critic import TurnCritic, critic_loss
    from learning.training.features import frozen_layers
    from learning.training.imitation import ImitationObjective, policy_loss

    task = load_task(task_ref)
    base = load_base_model(base_model)
    pad = base.tokenizer.pad_token_id
    records = generate_scripted_dialogues(task, batch_size * (steps + 1), seed=0)
    items, _ = encode_records(records, base.tokenizer, task)
    batches = [list(range(i, i + batch_size)) for i in range(0, batch_size * (steps + 1), batch_size)]
    result: dict[str, float] = {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=row.endswith("-bf16"))
    if row.startswith("sft"):
        model = attach_lora(base.model, rank=16, alpha=32, mlp=True)

        def step(indices: list[int]) -> int:
            batch = collate([items[i] for i in indices], pad)
            labels = batch.input_ids.masked_fill(~batch.action_mask, -100)
            with autocast:
                loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
            loss.backward()
            return batch.num_tokens

    else:
        model = attach_lora(base.model, rank=16, alpha=32, mlp=True, upper_layers=4)
        split = frozen_layers(model)
        started = time.perf_counter()
        with autocast:
            lower = LowerStates.build(model, [item.input_ids for item in items], split=split, pad_id=pad)
        result["lower_pass_dialogues_per_s"] = len(items) / (time.perf_counter() - started)
        upper = UpperStack.of(model, split)
        embedding = output_embedding(model).detach()
        objective = ImitationObjective(items, None, [1 / len(items)] * len(items), batch_size)
        config = TrainConfig()
        critic = TurnCritic(upper, embedding.shape[1], rank=16, alpha=32, mlp=True) if row == "critic" else None

        def step(indices: list[int]) -> int:
            batch = collate([items[i] for i in indices], pad)
            if critic is not None:
                loss, _ = critic_loss(critic, items, indices, lower)
            else:
                with autocast:
                    hidden = upper(lower.batch(indices))
                    weights = objective.token_weights(indices, batch)
                    loss, _ = policy_loss(
                        model, hidden, batch, weights, objective.normalizer, embedding, None, config, (0.0, 1.0)
                    )
            loss.backward()
            return batch.num_tokens

    step(batches[0])  # warm-up
    started, tokens = time.perf_counter(), 0
    for indices in batches[1:]:
        tokens += step(indices)
    seconds = time.perf_counter() - started
    result.update(
        dialogues_per_s=batch_size * steps / seconds,
        tokens_per_s=tokens / seconds,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model")
    parser.add_argument("--task", default="travel", help="a built-in task's name or the path of a task TOML")
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="passes over the data the lower pass is amortised over")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    base_model = args.base_model or ("tiny" if args.quick else "smollm2")
    if args.one:
        print(json.dumps(measure(args.one, base_model, args.steps, args.batch_size, args.threads, args.task)))
        return
    console = Console()
    results: dict[str, dict[str, float]] = {}
    for row in args.rows.split(","):
        command = [sys.executable, __file__, "--one", row, "--base-model", base_model, "--steps", str(args.steps)]
        command += ["--task", args.task]
        command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        with console.status(f"measuring {ROWS[row]}…"):
            output = subprocess.run(command, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            console.print(f"[red]{row} failed:[/red] {output.stderr[-2000:]}")
            continue
        results[row] = json.loads(output.stdout.strip().splitlines()[-1])
    reference = results.get("sft", {}).get("dialogues_per_s")
    table = Table(title=f"Training speed ({base_model}, batch {args.batch_size} travel dialogues, CPU)")
    columns = ("method", "dialogues/s", "× plain SFT", f"amortised over {args.epochs} epochs", "× plain SFT", "RSS MB")
    for column in columns:
        table.add_column(column)
    rows = []
    for row, result in results.items():
        rate = result["dialogues_per_s"]
        lower = result.get("lower_pass_dialogues_per_s")
        # per dialogue: `epochs` training steps' share plus one lower pass
        amortised = 1 / (1 / rate + 1 / (lower * args.epochs)) if lower else rate
        cells = (
            ROWS[row],
            f"{rate:.2f}",
            f"{rate / reference:.2f}×" if reference else "–",
            f"{amortised:.2f}",
            f"{amortised / reference:.2f}×" if reference else "–",
            f"{result['peak_rss_mb']:.0f}",
        )
        rows.append(cells)
        table.add_row(*cells)
    console.print(table)
    lower_rates = [r["lower_pass_dialogues_per_s"] for r in results.values() if "lower_pass_dialogues_per_s" in r]
    load = os.getloadavg()[0]
    if not args.no_append:
        lines = [
            run_heading(reproduce_command(__file__)),
            "",
            f"{machine()}, torch {torch.__version__}, {args.threads} threads, load average {load:.1f} at the end "
            f"({'quiet' if load < args.threads + 0.5 else 'NOT quiet'}), {args.steps} timed steps after one "
            f"warm-up, batch {args.batch_size} scripted travel dialogues, LoRA r=16 on attention + MLP, fp32 "
            f"unless noted. The lower pass (once per dialogue) ran at {max(lower_rates, default=0):.2f} "
            "dialogues/s.",
            "",
            f"| {' | '.join(columns)} |",
            "|---|---|---|---|---|---|",
            *(f"| {' | '.join(r)} |" for r in rows),
        ]
        write_section(f"Training throughput ({base_model})", "\n".join(lines))


if __name__ == "__main__":
    main()
