"""Benchmark: does offline RL beat imitation on suboptimal data? Every method, same data, same base, same users.

1. Scripted behaviour agents of four skills talk to the simulated users of the task's compiled world (``--task``:
   ``travel``, ``teaching`` or any task TOML, e.g. ``examples/houseplants.toml``): suboptimal dialogues, 20-40 %
   success, the optimal "listen, ask the rest, then act" present but rare. Training uses the training split only.
2. From SmolLM2-135M + LoRA on the same dialogues: BC (all), filtered BC (successes), token-level ILQL (the
   paper's method: value heads on top of the BC checkpoint, β-guided decoding) and ``critic-awr`` (the default:
   a per-turn critic, then the filtered-BC actor fine-tuned by advantage-weighted regression; decodes like BC).
3. Every policy, the prompted base model and the scripted careful agent (the ceiling) meet the same users in one
   evaluation, so differences are paired: ``--episodes`` of value combinations never trained on, speaking
   phrasings never trained on (the held-out split, seed 1000), and half as many of the training split (seen
   combinations and phrasings, other personas), reported separately.

Prints a table, appends it with the reproducing command to BENCHMARKS.md, writes ``report.md``/``report.png``,
a few transcripts per policy and the summary ``bench/results/rl_vs_bc-<task>.json``. Run it alone on the
machine: it is a benchmark (training minutes and wall time are part of the result).

Usage::

    .venv/bin/python bench/rl_vs_bc.py --task travel          # the full run (CPU: about 45 minutes)
    .venv/bin/python bench/rl_vs_bc.py --task examples/houseplants.toml --policies base,fbc,critic-awr,careful
    .venv/bin/python bench/rl_vs_bc.py --quick                # tiny model, a minute: checks the pipeline only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from preamble import ROOT
from rich.console import Console
from rich.table import Table

from bench.benchmarks_md import reproduce_command, run_heading, write_section
from imagine.simulated import DEFAULT_MIX, BehaviourPolicy, generate_scripted_dialogues
from imagine.task import TaskSpec, load_task
from imagine.world import world_for
from learning.algorithms import DEFAULT_ALGORITHM
from learning.devices import resolve_device
from learning.evaluation import EvaluationReport, PolicyResult, evaluate, paired_difference
from learning.ilql import ILQLConfig
from learning.interface import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
from learning.policy import load_policy
from learning.report import write_report
from learning.training import TrainConfig, train
from storage.rewards import is_success

console = Console()
TRAINED = ("bc", "fbc", "ilql-token", "critic-awr")
EVALUATION_SEED = 1000  # training dialogues use seed 0: disjoint persona and paraphrase streams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="travel", help="a built-in task's name or the path of a task TOML")
    parser.add_argument("--quick", action="store_true", help="tiny model, few dialogues and steps (pipeline check)")
    parser.add_argument("--base-model", default=None, help="default: smollm2 (tiny with --quick)")
    parser.add_argument("--dialogues", type=int, default=None, help="training dialogues (default 3600; quick 120)")
    parser.add_argument("--episodes", type=int, default=None, help="evaluation episodes per policy (200; quick 24)")
    parser.add_argument(
        "--bc-steps",
        type=int,
        default=None,
        help="BC/FBC steps at most (default: the trainer's cap; the task probe or held-out loss may stop sooner)",
    )
    parser.add_argument("--awr-steps", type=int, default=None, help="critic-awr actor steps after its imitation phase")
    parser.add_argument("--critic-steps", type=int, default=None)
    parser.add_argument("--value-steps", type=int, default=None, help="token-level ILQL value steps")
    parser.add_argument("--upper-layers", type=int, default=None, help="LoRA layers (trainer default)")
    parser.add_argument("--lr", type=float, default=None, help="peak LoRA learning rate (trainer default)")
    parser.add_argument("--probe-states", type=int, default=None, help="held-out probe states (trainer default)")
    parser.add_argument(
        "--bc-fit-target",
        type=float,
        default=None,
        help="stop plain BC once the probe fits this share (trainer default; 0: never, held-out loss decides)",
    )
    parser.add_argument(
        "--sampled-temperature",
        type=float,
        default=1.0,
        help="also evaluate BC sampled at this temperature (the imitation check: at 1 a perfect imitator "
        "reproduces its data's success; 0: skip)",
    )
    parser.add_argument("--policies", default="base,bc,fbc,ilql-token,critic-awr,careful", help="comma-separated")
    parser.add_argument("--device", default="auto", help="auto (CUDA where available), cpu or cuda")
    parser.add_argument("--eval-batch", type=int, default=100, help="episodes decoded together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--transcripts", type=int, default=3, help="transcripts per policy printed and kept")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench" / "rl_vs_bc")
    parser.add_argument("--skip-existing", action="store_true", help="reuse checkpoints found in --work-dir")
    parser.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=EVALUATION_SEED,
        help="persona seed of the evaluation; use another one (e.g. 2000) while developing, so that choices are "
        "never tuned on the reported personas (a run with another seed never writes the summary)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.environ["TORCH_THREADS"] = str(args.threads)
    wall_started = time.monotonic()
    device = resolve_device(args.device)
    quick = args.quick
    base_model = args.base_model or ("tiny" if quick else "smollm2")
    n_dialogues = args.dialogues or (120 if quick else 3600)
    episodes = args.episodes or (24 if quick else 200)
    task = load_task(args.task)
    world = world_for(task)
    work = args.work_dir / f"{task.name}-{'quick' if quick else base_model}"
    work.mkdir(parents=True, exist_ok=True)
    wanted = [p.strip() for p in args.policies.split(",") if p.strip()]
    console.print(f"device {device_description(device)}; machine load {os.getloadavg()[0]:.1f} at start")

    records = generate_scripted_dialogues(task, n_dialogues, seed=0)
    data_success = sum(is_success(r.reward) for r in records) / len(records)
    console.print(f"{len(records)} scripted training dialogues, behaviour success {data_success:.1%}")

    common: dict[str, Any] = {
        "task": task.reference,
        "base_model": base_model,
        "seed": 0,
        "device": device,
        "feature_cache_dir": str(work / "features"),
    }
    if args.upper_layers is not None:
        common["upper_layers"] = args.upper_layers
    if args.lr is not None:
        common["lr"] = args.lr
    if args.probe_states is not None:
        common["probe_states"] = args.probe_states
    if quick:
        common.update(upper_layers=1, batch_size=4, eval_every=10, lr=2e-2)
    # BC and FBC run as `reverie train` and the improvement loop do unless told how many steps
    imitation_steps = {"steps": args.bc_steps or 30} if args.bc_steps or quick else {}
    checkpoints: dict[str, Path] = {}
    minutes: dict[str, float] = {}
    failures: dict[str, str] = {}
    reused: dict[str, float] = {}  # --skip-existing: checkpoint → the minutes its training took in an earlier run

    def run(name: str, config: TrainConfig, init_from: Path | None = None, after: str | None = None) -> None:
        out = work / name
        if args.skip_existing and (out / "manifest.json").is_file():
            console.print(f"reusing {out}")
            checkpoints[name] = out
            minutes[name] = json.loads((out / "manifest.json").read_text())["metrics"]["train_seconds"] / 60
            reused[name] = minutes[name]  # its own training, counted into the whole run's wall time
            minutes[name] += minutes.get(after, 0.0) if after else 0.0
            return
        started = time.monotonic()
        try:  # one failed run must not cost the others' results
            train(config, records, out_dir=out, init_from=init_from, progress=True, task=task)
        except Exception as error:
            traceback.print_exc()
            failures[name] = f"{type(error).__name__}: {error}"
            return
        # a policy trained on top of another one cost that one's training too
        minutes[name] = (time.monotonic() - started) / 60 + (minutes.get(after, 0.0) if after else 0.0)
        checkpoints[name] = out

    awr = TrainConfig(algorithm="critic-awr", **common)
    reference = awr.critic.reference  # the imitation critic-awr starts from: its checkpoint is shared
    if any(p in wanted for p in ("bc", "ilql-token")) or ("critic-awr" in wanted and reference == "bc"):
        bc_stop = {} if args.bc_fit_target is None else {"fit_target": args.bc_fit_target or None}
        run("bc", TrainConfig(algorithm="bc", **imitation_steps, **bc_stop, **common))
    if "fbc" in wanted or ("critic-awr" in wanted and reference == "fbc"):
        run("fbc", TrainConfig(algorithm="fbc", **imitation_steps, **common))
    if "critic-awr" in wanted and reference in checkpoints:
        # from the reference's checkpoint: the actor steps alone (critic-awr's minutes include the reference's)
        awr.critic.actor_steps = args.awr_steps or (20 if quick else awr.critic.actor_steps)
        if args.critic_steps or quick:
            awr.critic.steps = args.critic_steps or 20
        run("critic-awr", awr, init_from=checkpoints[reference], after=reference)
    if "ilql-token" in wanted and "bc" in checkpoints:
        value_steps = args.value_steps or (20 if quick else 600)
        config = TrainConfig(
            algorithm="ilql-token", steps=0, value_steps=value_steps, ilql=ILQLConfig(level="token"), **common
        )
        run("ilql-token", config, init_from=checkpoints["bc"], after="bc")

    policies: list[Any] = []
    if "base" in wanted:
        policies.append(
            load_policy("base", task=task, base_model=base_model, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, device=device)
        )
    for name in TRAINED:
        if name in wanted and name in checkpoints:
            policy = load_policy(
                checkpoints[name],
                task=task,
                base_model=base_model,
                max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                device=device,
            )
            policy.name = name
            policies.append(policy)
    if "bc" in wanted and "bc" in checkpoints and args.sampled_temperature > 0:
        # imitation check: sampled, BC should reproduce the data's own success; every other row decodes greedily
        sampled = load_policy(
            checkpoints["bc"],
            task=task,
            base_model=base_model,
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
            device=device,
            temperature=args.sampled_temperature,
        )
        sampled.name = f"bc T={args.sampled_temperature:g}"
        policies.append(sampled)
    if "careful" in wanted:
        careful = BehaviourPolicy(task, "careful")
        careful.name = "careful"
        policies.append(careful)
    started = time.monotonic()
    report = evaluate(
        policies, task, episodes=episodes, seed=args.eval_seed, batch_size=args.eval_batch, split="heldout"
    )
    seen = evaluate(
        policies, task, episodes=max(1, episodes // 2), seed=args.eval_seed, batch_size=args.eval_batch, split="train"
    )
    eval_minutes = (time.monotonic() - started) / 60
    data_on_eval = data_behaviours_success(task, episodes, args.eval_seed, args.eval_batch)
    console.print(
        f"the data's behaviours on the evaluation personas: {data_on_eval:.1%} (training personas {data_success:.1%})"
    )
    for policy in policies:
        policy.close()
    # a reused checkpoint's training is part of what the comparison costs: its minutes count as if run here
    wall_minutes = (time.monotonic() - wall_started) / 60 + sum(reused.values())
    files = write_report(report, work / "report")
    transcripts = write_transcripts(report, work / "report" / "transcripts.md", args.transcripts)
    personas = len({json.dumps(e.persona, sort_keys=True) for e in report.results[0].episodes})
    combinations = {world.combination(e.persona) for e in report.results[0].episodes}
    unseen = sum(1 for e in report.results[0].episodes if world.combination_split(e.persona) == "heldout")

    rows = result_rows(report, minutes, seen)
    table = Table(
        title=f"RL vs BC on simulated {task.name} users ({base_model}, {episodes} held-out episodes: unseen value "
        f"combinations and phrasings)"
    )
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(transcripts)
    for name, reason in failures.items():
        console.print(f"[red]{name} failed: {reason}")
    console.print(f"evaluation {eval_minutes:.1f} min, whole run {wall_minutes:.1f} min; report in {work / 'report'}")
    summary = {
        "task": task.name,
        "task_file": os.path.relpath(task.reference, ROOT),
        "world": "compiled from the task TOML (imagine.world)",
        "episodes": episodes,
        "persona_space": world.persona_space,
        "eval_split": {
            "unseen_combinations": len(
                {
                    world.combination(e.persona)
                    for e in report.results[0].episodes
                    if world.combination_split(e.persona) == "heldout"
                }
            ),
            "evaluated_combinations": len(combinations),
            "unseen_episodes": unseen,
            "unseen_phrasings": True,
            "seen_split_episodes": seen.episodes,
        },
        "data_success": data_success,
        "data_success_eval_personas": data_on_eval,
        "wall_minutes": round(wall_minutes, 1),
        "reused_checkpoints": sorted(reused),
        "default": DEFAULT_ALGORITHM,
        "policies": {
            result.name: {
                "success": result.success_rate,
                "ci95": list(result.interval),
                "re_ask_rate": result.re_ask_rate,
                "seen_split_success": seen.result(result.name).success_rate,
                "train_minutes": round(minutes[result.name], 1) if result.name in minutes else None,
            }
            for result in report.results
        },
    }
    console.print_json(json.dumps(summary))
    if quick or args.no_append or args.eval_seed != EVALUATION_SEED:
        return
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"rl_vs_bc-{task.name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot = results / f"rl_vs_bc-{task.name}.png"
    shutil.copyfile(files.plot, plot)
    shutil.copyfile(work / "report" / "transcripts.md", results / f"rl_vs_bc-{task.name}-transcripts.md")
    append_markdown(
        args, task.name, rows, failures, base_model, device, n_dialogues, data_success, data_on_eval, episodes,
        personas, plot, summary["eval_split"], world.persona_space,
    )  # fmt: skip
    append_markdown_times(task.name, eval_minutes, wall_minutes, reused)


def data_behaviours_success(task: TaskSpec, episodes: int, seed: int, batch_size: int) -> float:
    """The success the training data's own behaviour mixture reaches on the evaluation personas: what BC sampled at
    temperature 1 should reproduce (the personas and paraphrases differ from training's)."""
    behaviours = []
    for name in DEFAULT_MIX:
        behaviour = BehaviourPolicy(task, name)
        behaviour.name = name
        behaviours.append(behaviour)
    report = evaluate(
        behaviours,
        task,
        split="heldout",
        episodes=episodes,
        seed=seed,
        batch_size=batch_size,
        progress=False,
    )
    total = sum(DEFAULT_MIX.values())
    return sum(DEFAULT_MIX[result.name] * result.success_rate for result in report.results) / total


COLUMNS = (
    "policy",
    "success (unseen)",
    "95% interval",
    "success (seen)",
    "re-asks",
    "agent turns",
    "vs BC",
    "vs FBC",
    "default vs it",
    "train min",
)


def result_rows(report: EvaluationReport, minutes: dict[str, float], seen: EvaluationReport) -> list[tuple[str, ...]]:
    """One row per evaluated policy: success on the held-out split with its interval, success on the seen split,
    re-ask rate, turns, paired differences (held-out), training minutes."""
    by_name = {result.name: result for result in report.results}

    def versus(result: PolicyResult, other: str, reverse: bool = False) -> str:
        baseline = by_name.get(other)
        if baseline is None or baseline is result:
            return ""
        a, b = (baseline, result) if reverse else (result, baseline)
        mean, low, high = paired_difference(a, b)
        return f"{100 * mean:+.1f} ({100 * low:+.1f}…{100 * high:+.1f})"

    rows = []
    for result in report.results:
        low, high = result.interval
        rows.append(
            (
                result.name + (" (default)" if result.name == DEFAULT_ALGORITHM else ""),
                f"{result.success_rate:.1%}",
                f"{low:.1%}–{high:.1%}",
                f"{seen.result(result.name).success_rate:.1%}",
                f"{result.re_ask_rate:.1%}",
                f"{result.mean_turns:.1f}",
                versus(result, "bc"),
                versus(result, "fbc"),
                versus(result, DEFAULT_ALGORITHM, reverse=True),
                f"{minutes[result.name]:.1f}" if result.name in minutes else "",
            )
        )
    return rows


def write_transcripts(report: EvaluationReport, path: Path, per_policy: int) -> str:
    """The first ``per_policy`` episodes of every policy, as markdown (who said what, the outcome)."""
    lines = []
    for result in report.results:
        lines.append(f"## {result.name}")
        for episode in result.episodes[:per_policy]:
            lines.append(f"\nepisode {episode.index}, persona {episode.persona}: **{episode.outcome}**\n")
            lines.extend(f"- {role}: {text}" for role, text in episode.turns)
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text + "\n", encoding="utf-8")
    return text


def device_description(device: str) -> str:
    """``NVIDIA H200 (cuda)`` or ``x86_64 CPU, 2 threads``."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (cuda), torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def append_markdown(
    args: argparse.Namespace,
    task_name: str,
    rows: list[tuple[str, ...]],
    failures: dict[str, str],
    base_model: str,
    device: str,
    n_dialogues: int,
    data_success: float,
    data_on_eval: float,
    episodes: int,
    personas: int,
    plot: Path,
    eval_split: dict[str, Any],
    persona_space: int,
) -> None:
    load = os.getloadavg()[0]
    lines = [
        run_heading(reproduce_command(__file__)),
        "",
        f"{device_description(device)}, load average {load:.1f} at the end "
        f"({'quiet: nothing else ran' if load < args.threads + 0.5 else 'NOT quiet: other work shared the CPU'}). "
        f"World compiled from `{os.path.relpath(load_task(args.task).reference, ROOT)}` ({persona_space} value "
        f"combinations). Data: {n_dialogues} scripted dialogues on the training split (behaviour success "
        f"{data_success:.1%}; the same behaviours reach {data_on_eval:.1%} on the held-out users, what sampled BC "
        f"should match). Evaluation: {episodes} episodes of held-out users (seed {EVALUATION_SEED}; "
        f"{eval_split['unseen_combinations']} value combinations never trained on, {personas} distinct personas, "
        "speaking phrasings never trained on); 'success (seen)' is "
        f"{eval_split['seen_split_episodes']} episodes of the training split (seen combinations and phrasings); "
        "re-asks: share of episodes where the agent asked for a value the user had already given; "
        "every conversation opened by the task's opening line as in training and serving; every policy decodes as "
        f"the bot serves it (temperature {DEFAULT_TEMPERATURE:g}, {DEFAULT_MAX_NEW_TOKENS} new tokens) except the "
        "sampled BC row, the "
        "imitation check. Paired differences in "
        "points of success with 95 % intervals; 'default vs it' is the default policy minus that row's.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        *(f"- {name} failed: {reason}" for name, reason in failures.items()),
        f"![success rates]({plot.relative_to(ROOT).as_posix()}) · "
        f"[transcripts](bench/results/rl_vs_bc-{task_name}-transcripts.md) · "
        f"[summary](bench/results/rl_vs_bc-{task_name}.json)",
    ]
    write_section(f"RL vs BC on simulated {task_name} users (bench/rl_vs_bc.py)", "\n".join(lines))


def append_markdown_times(task_name: str, eval_minutes: float, wall_minutes: float, reused: dict[str, float]) -> None:
    line = f"Evaluation {eval_minutes:.1f} min; whole run (all training + all evaluation) {wall_minutes:.1f} min"
    if reused:
        names = ", ".join(f"{name} {minutes:.1f}" for name, minutes in sorted(reused.items()))
        line += f", including the training minutes of checkpoints reused from an earlier run ({names})"
    write_section(f"RL vs BC on simulated {task_name} users (bench/rl_vs_bc.py)", line + ".")


if __name__ == "__main__":
    main()
