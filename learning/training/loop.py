"""Training BC, filtered BC, critic-awr and ILQL on one code path, in stages, with checkpoints and resume.

Stages (``docs/architecture.md``, "Algorithms"):

0. **critic** (critic-awr) — a per-turn critic on the frozen lower layers; its advantages become one imitation
   weight per agent turn (``critic.py``).
1. **policy** — LoRA on the base model trained with the (weighted) imitation loss ``λ_bc·L_BC`` on all dialogues
   (BC, critic-awr, ILQL) or on successful ones only (filtered BC). BC, FBC and critic-awr stop here.
2. **value** (ILQL) — the policy trunk is frozen; its hidden states at the positions ILQL needs are
   computed once and the value heads (twin Q, Polyak targets, expectile V, CQL at token level) are trained
   on them. Value learning cannot damage the language model, and each step costs only the heads.

``ilql.trunk_grad=True`` (token level) instead trains the paper's joint loss ``L_Q + L_V + λ_cql·L_CQL +
λ_bc·L_BC`` with value gradients flowing into the shared LoRA trunk in stage 1 (measured unstable here;
kept for comparison).

Entry points: :func:`train` (library / subprocess, re-exported by ``learning.training``) and ``reverie train``
(``bot/commands/train.py``). Interrupted runs resume from ``.<out>.resume`` next to the output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors.torch import load_file

from imagine.task import TaskSpec, load_task
from learning.base_model import load_base_model
from learning.checkpoint import HEADS_FILE, check_base_model, load_manifest, verify_checkpoint
from learning.cpus import follow_cpu_affinity
from learning.dataset import (
    DatasetError,
    EncodedDialogue,
    EncodingConfig,
    MixingSampler,
    collate,
    encode_records,
    return_range,
    split_held_out,
)
from learning.devices import native_bf16
from learning.ilql import ValueHeads
from learning.lora import attach_lora, load_lora, output_embedding
from learning.split_trunk import LowerStates, UpperStack
from learning.training.config import TrainConfig
from learning.training.critic import train_critic
from learning.training.features import build_feature_table, frozen_layers, lower_cache_file, question_token_ids
from learning.training.imitation import ImitationObjective, held_out_loss, policy_loss
from learning.training.optim import EarlyStopping, warmup_cosine
from learning.training.probes import ProbeFit, TaskProbe, probe_fit, task_probes
from learning.training.progress import Clock, format_terms, progress_bar
from learning.training.replicas import Replicas
from learning.training.resume import load_resume, resume_dir, save_resume, tuple_state, write_checkpoint
from learning.training.values import decision_diagnostics, value_step_loss
from storage import DialogueRecord

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python and torch RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Run:
    """What every stage of one training run reads: the data, the model pieces, the bar and the clock."""

    config: TrainConfig
    task: TaskSpec
    replicas: Replicas
    clock: Clock
    bar: Progress
    bf16: bool
    tokenizer: Any
    items: list[EncodedDialogue]  # training dialogues first, then the held-out ones (one index space)
    train_items: list[EncodedDialogue]
    held_indices: list[int]
    returns: tuple[float, float]
    model: torch.nn.Module
    upper: UpperStack
    lower: LowerStates
    embedding: torch.Tensor
    sampler: MixingSampler
    state: dict[str, Any]  # stage and step counters, resumable
    metrics: dict[str, Any]
    stop_when_learned: bool  # the task probe may end the policy stage (``TrainConfig.fit_target``)

    @property
    def device(self) -> torch.device:
        """Where this replica computes."""
        return self.replicas.device

    def autocast(self) -> torch.autocast:
        """bf16 autocast where the config asks for it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def train(
    config: TrainConfig,
    dialogues: Sequence[DialogueRecord],
    *,
    out_dir: Path,
    init_from: Path | None = None,
    progress: bool = True,
    task: TaskSpec | None = None,
) -> Path:
    """Train ``config.algorithm`` on ``dialogues`` and write a checkpoint to ``out_dir``; returns its path.

    ``init_from`` continues from an existing checkpoint's adapter (same base model). critic-awr from the base
    model first imitates its reference (``config.critic.reference``: filtered BC or BC, ``config.steps`` steps at
    most, into ``.<out>.<reference>`` next to ``out_dir``) and then trains the critic-weighted actor from that
    adapter (``config.critic.actor_steps``); from ``init_from`` it runs the actor steps alone. An interrupted run
    with the same configuration resumes from its last periodic save. Raises :class:`DatasetError` on unusable data
    and :class:`TrainingError` / :class:`~learning.checkpoint.CheckpointError` on bad configuration.
    """
    out_dir = Path(out_dir)
    if not config.uses_critic:
        return _train(config, dialogues, out_dir=out_dir, init_from=init_from, progress=progress, task=task)
    actor = dataclasses.replace(config, steps=config.critic.actor_steps, warmup=0.0)
    if init_from is not None:
        return _train(actor, dialogues, out_dir=out_dir, init_from=init_from, progress=progress, task=task)
    reference = config.critic.reference
    if reference == "fbc" and not any(r.reward is not None and r.reward >= config.fbc_min_reward for r in dialogues):
        logger.warning("no successful dialogue to imitate: critic-awr's imitation phase falls back to plain BC")
        reference = "bc"
    warm = out_dir.parent / f".{out_dir.name}.{reference}"
    # Both phases read the same frozen-layer states: computed once (a temporary cache unless one is configured).
    features = out_dir.parent / f".{out_dir.name}.features"
    actor.feature_cache_dir = config.feature_cache_dir or str(features)
    if not _finished(warm):
        imitation = dataclasses.replace(config, algorithm=reference, feature_cache_dir=actor.feature_cache_dir)
        # BC trains on exactly the actor's (rewarded) data; filtered BC on its successful part
        _train(
            imitation,
            dialogues,
            out_dir=warm,
            progress=progress,
            task=task,
            require_reward=True,
            stop_when_learned=True,
        )
    warm_metrics = load_manifest(warm)["metrics"]
    # the imitation phase's checkpoint is a temporary: what it learned and why it stopped go into the final manifest
    prior = {
        "imitation_algorithm": reference,
        "imitation_steps": warm_metrics["policy_steps"],
        "imitation_seconds": warm_metrics["train_seconds"],
        "imitation_stopped_at_fit_target": warm_metrics.get("stopped_at_fit_target", False),
        "imitation_held_out_curve": warm_metrics.get("held_out_curve", []),
    }
    if config.time_limit_minutes:  # one limit for both phases
        actor.time_limit_minutes = max(config.time_limit_minutes - prior["imitation_seconds"] / 60, 0.1)
    path = _train(actor, dialogues, out_dir=out_dir, init_from=warm, progress=progress, task=task, prior=prior)
    shutil.rmtree(warm, ignore_errors=True)
    shutil.rmtree(features, ignore_errors=True)
    return path


def _finished(directory: Path) -> bool:
    """Whether ``directory`` holds a complete, intact checkpoint (a warm-up phase that need not run again)."""
    try:
        verify_checkpoint(directory)
    except Exception:  # missing, partial or corrupt: train it (again)
        return False
    return True


def _train(
    config: TrainConfig,
    dialogues: Sequence[DialogueRecord],
    *,
    out_dir: Path,
    init_from: Path | None = None,
    progress: bool = True,
    task: TaskSpec | None = None,
    prior: dict[str, Any] | None = None,
    require_reward: bool | None = None,
    stop_when_learned: bool | None = None,
) -> Path:
    """One training run of ``config`` (see :func:`train`); ``prior`` metrics of an earlier phase go into its
    manifest, and their seconds into ``train_seconds``; ``require_reward`` overrides the algorithm's need for
    rewarded dialogues (critic-awr's imitation phase trains on exactly the actor's data); ``stop_when_learned``
    lets the task probe end the policy stage (default: filtered BC only, see ``TrainConfig.fit_target``)."""
    task = task or load_task(config.task)
    seed_everything(config.seed)
    clock = Clock(config.time_limit_minutes)

    replicas = Replicas.join(config.device)  # one process, or this one's place in an `accelerate launch` job
    device = replicas.device
    bf16 = config.bf16 if config.bf16 is not None else native_bf16(device)
    base = load_base_model(
        config.base_model, cache_dir=Path(config.cache_dir) if config.cache_dir else None, device=device
    )
    tokenizer = base.tokenizer
    encoding = EncodingConfig(max_length=config.max_length, thumbs_weight=config.thumbs_weight)
    needs_reward = config.algorithm != "bc" if require_reward is None else require_reward
    min_reward = config.fbc_min_reward if config.algorithm == "fbc" else None
    encoded, summary = encode_records(
        dialogues, tokenizer, task, config=encoding, require_reward=needs_reward, min_reward=min_reward
    )
    train_items, held_items = split_held_out(encoded, config.held_out, config.seed)
    items = train_items + held_items  # one index space for the cached states: training dialogues first
    held_indices = list(range(len(train_items), len(items)))
    returns = return_range(train_items)
    if (config.uses_values or config.uses_critic) and returns[0] == returns[1]:
        raise DatasetError(f"every dialogue has the same return {returns[0]}: there is nothing for RL to learn")
    logger.info(
        "training %s on %d dialogues (%s), %d held out",
        config.resolved_algorithm,
        len(train_items),
        summary.by_source,
        len(held_items),
    )

    model = base.model
    if init_from is not None:
        verify_checkpoint(init_from)
        manifest = load_manifest(init_from)
        check_base_model(manifest, base.model_id, init_from)
        model = (
            load_lora(model, Path(init_from), trainable=True)
            if manifest.get("has_adapter", True)
            else _attach(model, config)
        )
    else:
        model = _attach(model, config)
    split = frozen_layers(model)
    upper = UpperStack.of(model, split)
    embedding = output_embedding(model).detach()
    hidden_size = embedding.shape[1]
    heads = ValueHeads(hidden_size, embedding.shape[0], config.ilql).to(device) if config.uses_values else None
    if heads is not None and init_from is not None and (Path(init_from) / HEADS_FILE).is_file():
        saved = load_file(str(Path(init_from) / HEADS_FILE))
        if {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in heads.state_dict().items()}:
            heads.load_state_dict(saved)

    sampler = MixingSampler(
        train_items,
        batch_size=config.batch_size,
        real_ratio=config.real_ratio,
        max_real_weight=config.real_max_weight,
        source_weights=config.source_weights,
        seed=config.seed + replicas.rank,  # each replica draws its own batches; gradients are averaged
    )
    lora_params = [p for p in model.parameters() if p.requires_grad]
    joint = heads is not None and config.ilql.level == "token" and config.ilql.trunk_grad
    policy_params = lora_params + (heads.trainable_parameters() if joint and heads else [])
    optimizer = torch.optim.AdamW(policy_params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.steps, config.warmup)
    value_optimizer = (
        torch.optim.AdamW(heads.trainable_parameters(), lr=config.value_lr, weight_decay=0.0) if heads else None
    )

    state: dict[str, Any] = {"stage": "policy", "step": 0, "value_step": 0, "metrics": {}}
    resume = resume_dir(out_dir)
    if (resume / "state.json").is_file():
        saved_state = json.loads((resume / "state.json").read_text())
        if saved_state.get("fingerprint") == config.fingerprint():
            load_resume(resume, model, heads, optimizer, value_optimizer)
            state = saved_state
            for _ in range(state["step"]):
                scheduler.step()
            sampler.random.setstate(tuple_state(saved_state["sampler_rng"]))  # the main replica's
            if replicas.rank:
                sampler.random.seed(config.seed * 1_000_003 + replicas.rank * 1009 + state["step"])
            torch.set_rng_state(torch.tensor(saved_state["torch_rng"], dtype=torch.uint8))
            logger.info("resuming from %s at %s step %d", resume, state["stage"], state["step"])
        else:
            logger.warning("ignoring %s: it belongs to a run with other settings", resume)

    def periodic_save() -> None:
        if not replicas.is_main:
            return
        state["metrics"] = metrics
        state["fingerprint"] = config.fingerprint()
        state["sampler_rng"] = sampler.random.getstate()
        state["torch_rng"] = torch.get_rng_state().tolist()
        save_resume(resume, state, model, heads, optimizer, value_optimizer)

    metrics: dict[str, Any] = dict(state.get("metrics", {}))
    interrupted = False
    probes = task_probes(task, dialogues, [items[i] for i in held_indices], limit=config.probe_states)
    with progress_bar(progress and replicas.is_main) as bar:
        started = time.monotonic()
        # no gradients here, only products over many rows: bf16 wherever it is native (AMX: 2.4× measured for
        # this pass on one core), even where the config keeps the trained layers in fp32
        frozen_bf16 = bf16 or native_bf16(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=frozen_bf16):
            lower = LowerStates.build(
                model,
                [item.input_ids for item in items],
                split=split,
                pad_id=tokenizer.pad_token_id,
                cache_file=lower_cache_file(config, base.model_id, split),
                progress=bar,
            )
        metrics["frozen_layers_seconds"] = round(time.monotonic() - started, 1)
        metrics["bf16"] = bf16
        run = _Run(
            config=config,
            task=task,
            replicas=replicas,
            clock=clock,
            bar=bar,
            bf16=bf16,
            tokenizer=tokenizer,
            items=items,
            train_items=train_items,
            held_indices=held_indices,
            returns=returns,
            model=model,
            upper=upper,
            lower=lower,
            embedding=embedding,
            sampler=sampler,
            state=state,
            metrics=metrics,
            stop_when_learned=config.algorithm == "fbc" if stop_when_learned is None else stop_when_learned,
        )
        if config.uses_critic and "turn_weights" not in state:
            _critic_stage(run, hidden_size)
        if state["stage"] == "policy" and state["step"] < config.steps and not clock.expired():
            interrupted = _policy_stage(
                run, optimizer, scheduler, policy_params, heads if joint else None, probes, periodic_save
            )
        if not interrupted and heads is not None and not joint and replicas.is_main:
            # the value stage trains small heads on cached features: the main replica alone does it
            state["stage"] = "value"
        value_stage = state["stage"] == "value" and heads is not None and value_optimizer is not None
        if value_stage and replicas.is_main and not interrupted:
            assert heads is not None and value_optimizer is not None
            interrupted = _value_stage(run, heads, value_optimizer, periodic_save)

    metrics.update(replicas.summary(lora_params))
    metrics.update(
        policy_steps=state["step"],
        value_steps=state["value_step"],
        interrupted_by_time_limit=interrupted,
        return_range=list(returns),
        frozen_layers=split,
        held_out_dialogues=len(held_items),
        train_seconds=round(time.monotonic() - clock.start + (prior or {}).get("imitation_seconds", 0.0), 1),
        **(prior or {}),
    )
    if heads is not None:
        metrics["heads_parameters"] = heads.parameter_count()
        metrics["heads_bytes"] = heads.size_bytes()
    if replicas.is_main:
        write_checkpoint(
            out_dir, model, heads, config, base.model_id, metrics, summary, items, hidden_size, embedding.shape[0]
        )
        shutil.rmtree(resume, ignore_errors=True)
    replicas.wait()
    return out_dir


def _critic_stage(run: _Run, hidden_size: int) -> None:
    """Stage 0 (critic-awr): train the per-turn critic; its advantage weights go into ``run.state``."""
    config, model = run.config, run.model
    critic_sampler = MixingSampler(
        run.train_items,
        batch_size=config.batch_size,
        real_ratio=config.real_ratio,
        max_real_weight=config.real_max_weight,
        source_weights=config.source_weights,
        seed=config.seed + 7919,
    )

    def base_hidden_of(indices: Sequence[int]) -> torch.Tensor:
        adapter = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), adapter, run.autocast():
            return run.upper(run.lower.batch(indices).to(run.device))

    weights, critic_metrics = train_critic(
        config.critic,
        run.items,
        run.held_indices,
        run.lower,
        run.upper,
        hidden_size,
        critic_sampler,
        run.bar,
        run.clock.deadline,
        base_hidden_of=base_hidden_of,
        min_reward=config.fbc_min_reward,
    )
    run.state["turn_weights"] = weights
    run.metrics.update(critic_metrics)


def _policy_stage(
    run: _Run,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parameters: list[torch.nn.Parameter],
    joint_heads: ValueHeads | None,
    probes: Sequence[TaskProbe],
    periodic_save: Callable[[], None],
) -> bool:
    """Stage 1: weighted imitation (with the joint ILQL loss when ``joint_heads``), evaluated on the held-out
    dialogues every ``eval_every`` steps and stopped early on their loss. Returns whether the clock ran out."""
    config, model, state, metrics, bar = run.config, run.model, run.state, run.metrics, run.bar
    objective = ImitationObjective(run.items, state.get("turn_weights"), run.sampler.probabilities(), config.batch_size)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    batches = run.sampler.index_batches()
    task_id = bar.add_task(
        f"{config.resolved_algorithm}: policy", total=config.steps, completed=state["step"], terms=""
    )
    tokens, started = 0, time.monotonic()
    stopper = EarlyStopping(config.patience, lora_params)
    fit_target = config.fit_target if run.stop_when_learned else None
    learned = False
    curve: list[dict[str, float]] = metrics.setdefault("held_out_curve", [])
    interrupted = False
    while state["step"] < config.steps:
        follow_cpu_affinity()
        terms: dict[str, float] = {}
        for _ in range(config.grad_accum):
            indices = next(batches)
            batch = collate([run.items[i] for i in indices], run.tokenizer.pad_token_id).to(run.device)
            with run.autocast():
                hidden = run.upper(run.lower.batch(indices).to(run.device))
                loss, terms = policy_loss(
                    model,
                    hidden,
                    batch,
                    objective.token_weights(indices, batch),
                    objective.normalizer,
                    run.embedding,
                    joint_heads,
                    config,
                    run.returns,
                )
            (loss / config.grad_accum).backward()
            tokens += batch.num_tokens
        run.replicas.average_gradients(parameters)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if joint_heads is not None:
            joint_heads.update_targets()
        state["step"] += 1
        rate = tokens / max(time.monotonic() - started, 1e-9)
        metrics.update({f"policy_{k}": v for k, v in terms.items()}, policy_tokens_per_s=rate)
        done = state["step"] >= config.steps
        if run.held_indices and (state["step"] % config.eval_every == 0 or done):
            point: dict[str, float] = {"step": state["step"]}
            point.update(
                held_out_loss(
                    model, run.upper, run.items, run.held_indices, run.lower, objective, run.embedding, run.bf16
                )
            )
            fit = probe_fit(model, run.tokenizer, probes, run.task, run.bf16) if probes else ProbeFit(None, None)
            point.update(fit.as_metrics())
            curve.append(point)
            logger.info("held out at step %d: %s", state["step"], format_terms(point))
            model.train()
            if stopper.update(point["objective"], state["step"]):
                logger.info("early stop at step %d: held-out loss rose %d times", state["step"], config.patience)
                done = True
            elif fit_target is not None and fit.meets(fit_target):
                logger.info("task learned at step %d: greedy replies fit the probe states (%s)", state["step"], fit)
                done = learned = True
        bar.update(task_id, advance=1, terms=format_terms(terms, rate))
        if state["step"] % 25 == 0:
            logger.info("policy step %d/%d %s", state["step"], config.steps, format_terms(terms, rate))
        if state["step"] % config.checkpoint_every == 0 and not done:
            periodic_save()
        if run.replicas.any(run.clock.expired()):  # every replica stops at the same step
            interrupted = True
            break
        if run.replicas.any(done):
            break
    bar.remove_task(task_id)
    metrics["stopped_at_fit_target"] = learned
    # weights that reached the fit target are kept: the probe measured them, the loss's best may fit less
    if not learned and stopper.restore():
        metrics["best_step"] = stopper.best_step
        metrics["held_out_best"] = stopper.best
    if curve:
        metrics.update({f"held_out_{k}": v for k, v in curve[-1].items() if k != "step"})
    return interrupted


def _value_stage(
    run: _Run, heads: ValueHeads, optimizer: torch.optim.Optimizer, periodic_save: Callable[[], None]
) -> bool:
    """Stage 2 (ILQL): value heads on the frozen trunk's cached features. Returns whether the clock ran out."""
    config, model, state, metrics, bar = run.config, run.model, run.state, run.metrics, run.bar
    model.eval()
    features_from_base = config.ilql.value_features == "base" and hasattr(model, "disable_adapter")

    def hidden_of(indices: Sequence[int]) -> torch.Tensor:
        adapter = model.disable_adapter() if features_from_base else contextlib.nullcontext()
        with adapter, run.autocast():
            return run.upper(run.lower.batch(indices).to(run.device))

    table = build_feature_table(
        hidden_of,
        run.train_items,
        run.sampler.probabilities(),
        level=config.ilql.level,
        question_ids=question_token_ids(run.tokenizer),
        progress=bar,
    )
    generator = torch.Generator(device=run.device).manual_seed(config.seed + state["value_step"])
    task_id = bar.add_task("ilql: value", total=config.value_steps, completed=state["value_step"], terms="")
    value_bf16 = (
        config.value_bf16 if config.value_bf16 is not None else config.ilql.level == "token" and native_bf16(run.device)
    )
    started, seen = time.monotonic(), 0
    interrupted = False
    while state["value_step"] < config.value_steps:
        follow_cpu_affinity()
        rows = torch.multinomial(table.weights, config.value_batch_size, replacement=True, generator=generator)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=value_bf16):
            result = value_step_loss(heads, table, rows, run.embedding, run.returns)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.trainable_parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        heads.update_targets()
        state["value_step"] += 1
        seen += len(rows)
        rate = seen / max(time.monotonic() - started, 1e-9)
        metrics.update({f"value_{k}": v for k, v in result.terms.items()}, value_transitions_per_s=rate)
        bar.update(task_id, advance=1, terms=format_terms(result.terms))
        if state["value_step"] % 250 == 0:
            logger.info("value step %d/%d %s", state["value_step"], config.value_steps, format_terms(result.terms))
        if state["value_step"] % max(config.checkpoint_every * 5, 1) == 0:
            periodic_save()
        if run.clock.expired():
            interrupted = True
            break
    bar.remove_task(task_id)
    metrics.update(decision_diagnostics(heads, table, run.embedding))
    logger.info("decision-point diagnostics: %s", {k: round(v, 3) for k, v in metrics.items() if k[0] in "QV"})
    return interrupted


def _attach(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    return attach_lora(
        model, rank=config.lora_rank, alpha=config.lora_alpha, mlp=config.lora_mlp, upper_layers=config.upper_layers
    )
