"""Benchmark: does offline RL beat imitation on suboptimal data? BC vs filtered BC vs ILQL, same data, same base.

1. Scripted behaviour agents talk to scripted travel users (hidden interest/budget/companions): suboptimal
   dialogues, ~35-40 % success, the optimal "ask everything, then recommend" behaviour present but rare.
2. BC (all dialogues), filtered BC (reward 1 only) and ILQL are trained from the same base model + LoRA.
   ILQL's policy stage *is* the BC run (its checkpoint is reused), so the two differ only by value learning.
3. Every policy meets the same held-out personas (another seed) with scripted users; success rates with
   95 % Wilson intervals are printed and appended to BENCHMARKS.md with the reproducing command.

Every run also writes ``report.md``/``report.png``/``report.json`` (learning.report) and ``summary.json`` into
``--work-dir``; the PNG is copied to ``bench/results/`` beside the table appended to BENCHMARKS.md.
``--candidates`` and ``--beta`` take comma-separated lists: each value is one more evaluated ILQL policy
(decoding settings only, same checkpoint), so one run shows how reranking width and β matter.

Usage::

    .venv/bin/python bench/rl_vs_bc.py                 # SmolLM2, the full run (GPU: minutes; CPU: hours)
    .venv/bin/python bench/rl_vs_bc.py --quick         # tiny model, minutes: checks the pipeline only
    .venv/bin/python bench/rl_vs_bc.py --skip-existing # reuse checkpoints already in --work-dir
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.benchmarks_md import reproduce_command, run_heading, write_section  # noqa: E402
from imagine.simulated import generate_scripted_dialogues  # noqa: E402
from imagine.task import load_task  # noqa: E402
from learning.checkpoint import load_manifest  # noqa: E402
from learning.devices import resolve_device  # noqa: E402
from learning.evaluation import EvaluationReport, evaluate, paired_difference  # noqa: E402
from learning.ilql import ILQLConfig  # noqa: E402
from learning.policy import LearnedPolicy, load_policy  # noqa: E402
from learning.report import write_report  # noqa: E402
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
    parser.add_argument("--beta", default=None, help="token-level ILQL β at decoding; a list evaluates each")
    parser.add_argument("--tau", type=float, default=None, help="ILQL expectile τ (default: ILQLConfig's 0.7)")
    parser.add_argument("--candidates", default=None, help="utterance-level ILQL K at decoding; a list evaluates each")
    parser.add_argument("--algos", default="bc,fbc,ilql-utterance,ilql-token", help="comma-separated")
    parser.add_argument("--device", default="auto", help="auto (CUDA where available), cpu or cuda")
    parser.add_argument("--eval-batch", type=int, default=64, help="episodes decoded together (GPU: 200)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-base", action="store_true", help="leave the prompted base model out (slow on a CPU)")
    parser.add_argument("--max-length", type=int, default=320, help="tokens per training sequence")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench" / "rl_vs_bc")
    parser.add_argument("--skip-existing", action="store_true", help="reuse checkpoints found in --work-dir")
    parser.add_argument("--time-limit-minutes", type=float, default=None, help="per training run")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    return parser.parse_args()


def number_list(text: str | None, kind: type) -> list:
    """``"4,8"`` → ``[4, 8]``; ``None`` → ``[None]`` (the checkpoint's own setting)."""
    return [kind(part) for part in text.split(",") if part.strip()] if text else [None]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
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
    console.print(f"device {device_description(device)}")

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
        "device": device,
    }
    checkpoints: dict[str, Path] = {}
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}

    def run(name: str, config: TrainConfig, init_from: Path | None = None, directory: str | None = None) -> None:
        out = work / (directory or name)
        if args.skip_existing and (out / "manifest.json").is_file():
            console.print(f"reusing {out}")
            checkpoints[name] = out
            return
        started = time.monotonic()
        try:  # one failed run must not cost the others' results
            train(config, records, out_dir=out, init_from=init_from, progress=True, task=task)
        except Exception as error:
            traceback.print_exc()
            failures[name] = f"{type(error).__name__}: {error}"
            return
        timings[name] = time.monotonic() - started
        checkpoints[name] = out

    needs_bc = any(a in algos for a in ("bc", "ilql-utterance", "ilql-token"))
    if needs_bc:
        run("bc", TrainConfig(algorithm="bc", steps=bc_steps, **common))
    for name in algos:  # in the order given: the most informative first when time is short
        if name.startswith("ilql-") and "bc" in checkpoints:
            level = name.removeprefix("ilql-")
            ilql = ILQLConfig(level=level) if args.tau is None else ILQLConfig(level=level, tau=args.tau)  # type: ignore[arg-type]
            config = TrainConfig(algorithm=name, steps=0, ilql=ilql, **common)  # type: ignore[arg-type]
            if level == "token" and args.value_steps is None:
                config.value_steps = value_steps // 5  # each step is |V|-wide (CQL): fewer, costlier steps
            # the policy stage is the BC checkpoint: ILQL differs from BC only by its value heads
            run(name, config, init_from=checkpoints["bc"], directory=checkpoint_name(name, args.tau))
        elif name == "fbc":
            successes = sum((r.reward or 0) >= 1 for r in records)
            fbc_steps = max(1, bc_steps * successes // len(records))  # the same epochs over the kept data
            run("fbc", TrainConfig(algorithm="fbc", steps=fbc_steps, **common))

    policies: list[LearnedPolicy] = []
    if not args.no_base:
        policies.append(load_policy("base", task=task, base_model=base_model, max_new_tokens=40, device=device))
    trained: dict[str, str] = {}  # evaluated policy name → checkpoint name
    for name in algos:
        if name not in checkpoints:
            continue
        variants: list[tuple[str, dict]] = [(name, {})]
        if name == "ilql-utterance":
            variants = [(name + (f" K={k}" if k else ""), {"candidates": k}) for k in number_list(args.candidates, int)]
        elif name == "ilql-token":
            variants = [
                (name + (f" β={b:g}" if b is not None else ""), {"beta": b}) for b in number_list(args.beta, float)
            ]
        for label, overrides in variants:
            policy: LearnedPolicy = load_policy(
                checkpoints[name], task=task, base_model=base_model, max_new_tokens=40, device=device, **overrides
            )
            policy.name = label
            policies.append(policy)
            trained[label] = name
    started = time.monotonic()
    report = evaluate(
        policies, task, users="scripted", episodes=episodes, seed=1000, progress=True, batch_size=args.eval_batch
    )
    eval_seconds = time.monotonic() - started
    for policy in policies:
        policy.close()
    files = write_report(report, work / "report")

    rows = result_rows(report, trained, checkpoints, timings)
    table = Table(title=f"RL vs BC on scripted travel users ({base_model}, {episodes} held-out personas)")
    for column in ("policy", "success", "95% interval", "mean turns", "vs BC (paired)", "vs FBC (paired)", "notes"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for name, reason in failures.items():
        console.print(f"[red]{name} failed: {reason}")
    console.print(f"evaluation took {eval_seconds / 60:.1f} min; report in {files.markdown.parent}")
    summary = {
        "device": device_description(device),
        "data_success": data_success,
        "rows": rows,
        "failures": failures,
        "timings_s": timings,
        "eval_seconds": eval_seconds,
        "command": reproduce_command(__file__),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    if not args.no_append:
        stamp = f"{datetime.now(UTC):%Y%m%d-%H%M}"  # one plot per run, beside its table
        plot = ROOT / "bench" / "results" / f"rl_vs_bc-{'quick' if quick else base_model}-{stamp}.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files.plot, plot)
        append_markdown(
            args, rows, failures, base_model, device, n_dialogues, data_success, episodes, bc_steps, value_steps, plot
        )


def result_rows(
    report: EvaluationReport, trained: dict[str, str], checkpoints: dict[str, Path], timings: dict[str, float]
) -> list[tuple[str, ...]]:
    """One table row per evaluated policy: success, interval, turns, paired differences to BC and FBC."""
    baselines = {name: report.result(name) for name in ("bc", "fbc") if name in trained}
    rows = []
    for result in report.results:
        low, high = result.interval
        differences = []
        for baseline_name in ("bc", "fbc"):
            baseline = baselines.get(baseline_name)
            if baseline is None or baseline is result:
                differences.append("")
                continue
            mean, lo, hi = paired_difference(result, baseline)
            differences.append(f"{100 * mean:+.1f} ({100 * lo:+.1f}…{100 * hi:+.1f})")
        notes = ""
        checkpoint = trained.get(result.name)
        if checkpoint is not None:
            metrics = load_manifest(checkpoints[checkpoint])["metrics"]
            notes = ", ".join(
                f"{k}={metrics[k]:.2f}" for k in ("Q_ask", "Q_act", "V_decision", "policy_bc") if k in metrics
            )
            if checkpoint in timings:
                notes += f", train {timings[checkpoint] / 60:.1f} min"
        if result.error:
            notes += f" error: {result.error}"
        rows.append(
            (
                result.name,
                f"{result.success_rate:.1%}",
                f"{low:.1%}–{high:.1%}",
                f"{result.mean_turns:.1f}",
                *differences,
                notes,
            )
        )
    return rows


def checkpoint_name(algorithm: str, tau: float | None) -> str:
    """``ilql-utterance`` or, with a non-default expectile, ``ilql-utterance-tau0.9`` (runs never overwrite)."""
    return algorithm if tau is None else f"{algorithm}-tau{tau:g}"


def device_description(device: str) -> str:
    """``NVIDIA H200 (cuda)`` or ``x86_64 CPU, 2 threads``."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (cuda), torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def append_markdown(
    args: argparse.Namespace,
    rows: list[tuple[str, ...]],
    failures: dict[str, str],
    base_model: str,
    device: str,
    n_dialogues: int,
    data_success: float,
    episodes: int,
    bc_steps: int,
    value_steps: int,
    plot: Path,
) -> None:
    lines = [
        run_heading(reproduce_command(__file__)),
        "",
        f"{device_description(device)}. Data: {n_dialogues} scripted "
        f"dialogues (behaviour success {data_success:.1%}); BC {bc_steps} steps × batch {args.batch_size}; ILQL "
        f"value stage {value_steps} steps (token level: a fifth) on base-trunk features; evaluation on "
        f"{episodes} held-out personas (seed 1000). Paired differences are in points of success over the same "
        "personas, with 95 % intervals.",
        "",
        "| policy | success | 95% interval | mean agent turns | vs BC (paired) | vs FBC (paired) | notes |",
        "|---|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        *(f"- {name} failed: {reason}" for name, reason in failures.items()),
        f"![success rates]({plot.relative_to(ROOT).as_posix()})",
    ]
    write_section(
        f"RL vs BC on scripted travel users ({base_model}{', quick' if args.quick else ''})", "\n".join(lines)
    )
    console.print(json.dumps({"appended": "BENCHMARKS.md", "plot": str(plot)}))


if __name__ == "__main__":
    main()
