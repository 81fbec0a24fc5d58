"""Benchmark: does offline RL beat imitation on suboptimal data? BC vs filtered BC vs ILQL, same data, same base.

1. Scripted behaviour agents talk to scripted travel users (hidden interest/budget/companions): suboptimal
   dialogues, ~35-40 % success, the optimal "ask everything, then recommend" behaviour present but rare.
2. BC (all dialogues), filtered BC (reward 1 only) and ILQL are trained from the same base model + LoRA.
   ILQL's policy stage *is* the BC run (its checkpoint is reused), so the two differ only by value learning.
3. Every policy meets the same held-out personas (another seed) with scripted users; success rates with
   95 % Wilson intervals are printed and appended to BENCHMARKS.md with the reproducing command.

Usage::

    .venv/bin/python bench/rl_vs_bc.py                 # SmolLM2, the full run (CPU: about an hour)
    .venv/bin/python bench/rl_vs_bc.py --quick         # tiny model, minutes: checks the pipeline only
    .venv/bin/python bench/rl_vs_bc.py --skip-existing # reuse checkpoints already in --work-dir
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagine.simulated import generate_scripted_dialogues  # noqa: E402
from imagine.task import load_task  # noqa: E402
from learning.checkpoint import load_manifest  # noqa: E402
from learning.evaluation import evaluate  # noqa: E402
from learning.ilql import ILQLConfig  # noqa: E402
from learning.policy import load_policy  # noqa: E402
from learning.trainer import TrainConfig, train  # noqa: E402

console = Console()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few dialogues and steps (pipeline check)")
    parser.add_argument("--base-model", default=None, help="default: smollm2 (tiny with --quick)")
    parser.add_argument("--dialogues", type=int, default=None, help="training dialogues (default 1200; quick 120)")
    parser.add_argument("--episodes", type=int, default=None, help="evaluation episodes per policy (200; quick 24)")
    parser.add_argument("--bc-steps", type=int, default=None, help="BC policy steps (default ~3 epochs)")
    parser.add_argument("--value-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None, help="token-level ILQL β at decoding")
    parser.add_argument("--candidates", type=int, default=None, help="utterance-level ILQL K at decoding")
    parser.add_argument("--algos", default="bc,fbc,ilql-utterance,ilql-token", help="comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=320, help="tokens per training sequence")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench" / "rl_vs_bc")
    parser.add_argument("--skip-existing", action="store_true", help="reuse checkpoints found in --work-dir")
    parser.add_argument("--time-limit-minutes", type=float, default=None, help="per training run")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    quick = args.quick
    base_model = args.base_model or ("tiny" if quick else "smollm2")
    n_dialogues = args.dialogues or (120 if quick else 1200)
    episodes = args.episodes or (24 if quick else 200)
    batch_size = args.batch_size
    bc_steps = args.bc_steps or (30 if quick else max(1, 3 * n_dialogues // batch_size))
    value_steps = args.value_steps or (200 if quick else 3000)
    lr = args.lr or (2e-2 if quick else 3e-4)
    task = load_task("travel")
    work = args.work_dir / ("quick" if quick else base_model)
    work.mkdir(parents=True, exist_ok=True)

    records = generate_scripted_dialogues("travel", n_dialogues, seed=0)
    data_success = sum(r.reward or 0.0 for r in records) / len(records)
    console.print(f"{len(records)} scripted training dialogues, behaviour success {data_success:.1%}")

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    common = {
        "task": "travel",
        "base_model": base_model,
        "batch_size": batch_size,
        "lr": lr,
        "seed": 0,
        "max_length": args.max_length,
        "value_steps": value_steps,
        "time_limit_minutes": args.time_limit_minutes,
    }
    checkpoints: dict[str, Path] = {}
    timings: dict[str, float] = {}

    def run(name: str, config: TrainConfig, init_from: Path | None = None) -> None:
        out = work / name
        if args.skip_existing and (out / "manifest.json").is_file():
            console.print(f"reusing {out}")
        else:
            started = time.monotonic()
            train(config, records, out_dir=out, init_from=init_from, progress=True, task=task)
            timings[name] = time.monotonic() - started
        checkpoints[name] = out

    needs_bc = any(a in algos for a in ("bc", "ilql-utterance", "ilql-token"))
    if needs_bc:
        run("bc", TrainConfig(algorithm="bc", steps=bc_steps, **common))
    for name in algos:  # in the order given: the most informative first when time is short
        if name.startswith("ilql-"):
            level = name.removeprefix("ilql-")
            config = TrainConfig(algorithm=name, steps=0, ilql=ILQLConfig(level=level), **common)  # type: ignore[arg-type]
            if level == "token" and args.value_steps is None:
                config.value_steps = value_steps // 5  # each step is |V|-wide (CQL): fewer, costlier steps
            # the policy stage is the BC checkpoint: ILQL differs from BC only by its value heads
            run(name, config, init_from=checkpoints["bc"])
        elif name == "fbc":
            successes = sum((r.reward or 0) >= 1 for r in records)
            fbc_steps = max(1, bc_steps * successes // len(records))  # the same epochs over the kept data
            run("fbc", TrainConfig(algorithm="fbc", steps=fbc_steps, **common))

    policies = [load_policy("base", task=task, base_model=base_model, max_new_tokens=40)]
    for name in algos:
        policies.append(
            load_policy(
                checkpoints[name],
                task=task,
                base_model=base_model,
                max_new_tokens=40,
                beta=args.beta,
                candidates=args.candidates,
            )
        )
    started = time.monotonic()
    report = evaluate(policies, task, users="scripted", episodes=episodes, seed=1000, progress=True, batch_size=64)
    eval_seconds = time.monotonic() - started
    for policy in policies:
        policy.close()

    table = Table(title=f"RL vs BC on scripted travel users ({base_model}, {episodes} held-out personas)")
    for column in ("policy", "success", "95% interval", "mean turns", "notes"):
        table.add_column(column)
    rows = []
    for result in report.results:
        low, high = result.interval
        notes = ""
        name = result.name.split("#")[0]
        if name in checkpoints:
            metrics = load_manifest(checkpoints[name])["metrics"]
            notes = ", ".join(
                f"{k}={metrics[k]:.2f}" for k in ("Q_ask", "Q_act", "V_decision", "policy_bc") if k in metrics
            )
            if name in timings:
                notes += f", train {timings[name] / 60:.1f} min"
        row = (name, f"{result.success_rate:.1%}", f"{low:.1%}–{high:.1%}", f"{result.mean_turns:.1f}", notes)
        rows.append(row)
        table.add_row(*row)
    console.print(table)
    console.print(f"evaluation took {eval_seconds / 60:.1f} min")
    if not args.no_append:
        append_markdown(args, rows, base_model, n_dialogues, data_success, episodes, bc_steps, value_steps)


def append_markdown(
    args: argparse.Namespace,
    rows: list[tuple[str, ...]],
    base_model: str,
    n_dialogues: int,
    data_success: float,
    episodes: int,
    bc_steps: int,
    value_steps: int,
) -> None:
    command = "  ".join(["", ".venv/bin/python bench/rl_vs_bc.py", *sys.argv[1:]]).strip()
    lines = [
        "",
        f"## RL vs BC on scripted travel users ({base_model}{', quick' if args.quick else ''})",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()} CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Data: {n_dialogues} scripted dialogues (behaviour success "
        f"{data_success:.1%}); BC {bc_steps} steps × batch {args.batch_size}; ILQL value stage {value_steps} steps "
        f"on the BC trunk; evaluation on {episodes} held-out personas (seed 1000).",
        "",
        "| policy | success | 95% interval | mean agent turns | notes |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    with (ROOT / "BENCHMARKS.md").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    console.print(json.dumps({"appended": "BENCHMARKS.md"}))


if __name__ == "__main__":
    main()
