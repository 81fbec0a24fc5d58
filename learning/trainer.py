"""Training BC, filtered BC and ILQL on one code path, in stages, with checkpoints and resume.

Stages:

1. **policy** — LoRA on the base model trained with ``λ_bc·L_BC`` alone (the BC term of the ILQL loss) on
   all dialogues (BC, ILQL) or on successful ones only (filtered BC). BC and FBC stop here.
2. **value** (ILQL) — the policy trunk is frozen; its hidden states at the positions ILQL needs are
   computed once and the value heads (twin Q, Polyak targets, expectile V, CQL at token level) are trained
   on them. Value learning cannot damage the language model, and each step costs only the heads.

``ilql.trunk_grad=True`` (token level) instead trains the paper's joint loss ``L_Q + L_V + λ_cql·L_CQL +
λ_bc·L_BC`` with value gradients flowing into the shared LoRA trunk in stage 1 (measured unstable here;
kept for comparison).

Entry points: :func:`train` (library / subprocess) and ``reverie train`` (``bot/commands/train.py``).
Interrupted runs resume from ``.<out>.resume`` next to the output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from imagine.task import TaskSpec, load_task
from learning.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, Algorithm
from learning.base_model import load_base_model
from learning.checkpoint import HEADS_FILE, check_base_model, load_manifest, save_checkpoint, verify_checkpoint
from learning.critic import CriticConfig, train_critic
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
from learning.devices import resolve_device
from learning.ilql import (
    ILQLConfig,
    LossTerms,
    ValueHeads,
    token_nll,
    token_value_loss,
    utterance_value_loss,
)
from learning.lora import attach_lora, load_lora, output_embedding, save_lora
from learning.optim import EarlyStopping, warmup_cosine
from learning.probes import final_act_probes, probe_fit_rate
from learning.split_trunk import LowerStates, UpperStack, num_layers
from storage import DialogueRecord
from storage.rewards import SUCCESS_THRESHOLD, is_success

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad data, bad configuration); the message says why."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoint manifest); defaults measured on this CPU."""

    #: One of learning.algorithms.ALGORITHMS.
    algorithm: Algorithm = DEFAULT_ALGORITHM
    #: Built-in task name or task TOML path (its system prompt frames every dialogue).
    task: str = "travel"
    #: smollm2 (bundled), tiny (tests) or a local model directory / hub id.
    base_model: str = "smollm2"
    #: Where converted base models are kept (None: the default cache).
    cache_dir: str | None = None
    #: Policy-stage optimizer steps at most (early stopping may end sooner).
    steps: int = 400
    #: ILQL value-stage optimizer steps, on cached features.
    value_steps: int = 1500
    #: Dialogues per optimizer step (per micro-batch with grad_accum).
    batch_size: int = 16
    #: Micro-batches accumulated per optimizer step.
    grad_accum: int = 1
    #: Peak learning rate of the LoRA adapter (after warm-up; cosine decay to a tenth). Measured on travel (3600
    #: dialogues, 400 steps): at 1e-3 greedy replies at held-out full-knowledge states fit 53 % (the answers →
    #: activity mapping not learned); at 3e-3 they fit 91 %, held-out NLL 0.514 → 0.492.
    lr: float = 3e-3
    #: Fraction of the steps spent warming the learning rate up linearly.
    warmup: float = 0.05
    #: ILQL value heads' learning rate.
    value_lr: float = 1e-3
    #: Transitions per ILQL value step.
    value_batch_size: int = 256
    #: AdamW weight decay of the adapter.
    weight_decay: float = 0.0
    #: LoRA rank and alpha (scale alpha/rank).
    lora_rank: int = 16
    lora_alpha: int = 32
    #: LoRA on the MLP projections too, not only attention (more capacity for task knowledge).
    lora_mlp: bool = True
    #: LoRA on the top this many decoder layers only; the rest are frozen and run once per dialogue
    #: (None: every layer, nothing cached).
    upper_layers: int | None = 4
    #: Longest training sequence in tokens; longer dialogues lose whole turns from the start.
    max_length: int = 512
    #: Share of real (logged) dialogues in each batch when both kinds exist.
    real_ratio: float = 0.3
    #: Relative weight per source (default 1 each).
    source_weights: dict[str, float] = field(default_factory=dict)
    #: Per-turn reward = this × mean 👍/👎 (−1..1) on that agent turn.
    thumbs_weight: float = 0.25
    #: Filtered BC keeps dialogues with at least this reward (the success threshold).
    fbc_min_reward: float = SUCCESS_THRESHOLD
    #: Fraction of dialogues held out for the held-out loss, the task probe and early stopping.
    held_out: float = 0.1
    #: Policy steps between held-out evaluations.
    eval_every: int = 50
    #: Held-out evaluations without improvement before stopping (0: never stop early).
    patience: int = 3
    #: Held-out states at which the policy's greedy reply is checked against the task (scripted tasks only).
    probe_states: int = 24
    #: Seed of sampling, held-out split and initialisation.
    seed: int = 0
    #: bf16 autocast (None: on CUDA only; on this CPU fp32 matmuls measured faster than bf16).
    bf16: bool | None = None
    #: bf16 for the ILQL value heads (None: token level only, whose CQL is |V| wide).
    value_bf16: bool | None = None
    #: Policy steps between resumable saves.
    checkpoint_every: int = 100
    #: Stop (and save what was learned) after this many minutes.
    time_limit_minutes: float | None = None
    #: auto (CUDA where available), cpu or cuda.
    device: str = "auto"
    #: Directory where frozen-layer states are kept between runs on the same data (None: recompute).
    feature_cache_dir: str | None = None
    #: ILQL hyperparameters.
    ilql: ILQLConfig = field(default_factory=ILQLConfig)
    #: Per-turn critic and advantage weighting (critic-awr).
    critic: CriticConfig = field(default_factory=CriticConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ilql, dict):
            self.ilql = ILQLConfig(**self.ilql)
        if isinstance(self.critic, dict):
            self.critic = CriticConfig(**self.critic)
        if self.algorithm not in ALGORITHMS:
            raise TrainingError(f"unknown algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "ilql-token":
            self.ilql.level = "token"
        elif self.algorithm == "ilql-utterance":
            self.ilql.level = "utterance"

    @property
    def resolved_algorithm(self) -> str:
        """``bc``, ``fbc``, ``ilql-token`` or ``ilql-utterance`` (what the manifest records)."""
        if self.algorithm.startswith("ilql"):
            return f"ilql-{self.ilql.level}"
        return self.algorithm

    @property
    def uses_critic(self) -> bool:
        """Whether this run trains the per-turn critic and weights imitation by its advantages."""
        return self.algorithm == "critic-awr"

    @property
    def uses_values(self) -> bool:
        """Whether this run trains value heads."""
        return self.algorithm.startswith("ilql")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = dataclasses.asdict(self)
        data["ilql"] = self.ilql.to_dict()
        data["critic"] = dataclasses.asdict(self.critic)
        return data

    def fingerprint(self) -> str:
        """A hash of the settings that make a resumed run the same run."""
        data = self.to_dict()
        for volatile in ("time_limit_minutes", "checkpoint_every", "cache_dir", "device", "feature_cache_dir"):
            data.pop(volatile, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed Python and torch RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)


# --- data -----------------------------------------------------------------------------------------------


def load_dialogues_jsonl(path: Path) -> list[DialogueRecord]:
    """Read ``DialogueRecord.to_dict()`` lines; :class:`DatasetError` names the bad line."""
    from storage.store import StoreError

    records: list[DialogueRecord] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: no such file") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(DialogueRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, StoreError, ValueError, TypeError) as error:
            raise DatasetError(f"{path}:{number}: not a dialogue: {error}") from error
    return records


def _transitions_summary(items: Sequence[EncodedDialogue]) -> dict[str, Any]:
    return {
        "transitions_token": sum(i.num_actions for i in items),
        "transitions_turn": sum(len(i.turn_end) for i in items),
    }


# --- cached features for the value stage ----------------------------------------------------------------


@dataclass
class FeatureTable:
    """Frozen-trunk features of every transition the value stage needs (rows, not padded sequences).

    Token level: ``states[i]`` is ``h`` before action ``actions[i]``; ``next_rows[i]`` indexes ``states``
    for ``s′`` (−1 when done). Utterance level: ``states``/``ends`` are ``h(s)`` and ``h_end(u)`` per agent
    turn. ``weights`` follow the mixing sampler's probabilities; ``asks`` marks replies with a question
    (for diagnostics: Q(ask) vs Q(act) at decision points); ``first`` marks each turn's first decision.
    """

    states: torch.Tensor
    ends: torch.Tensor | None
    actions: torch.Tensor | None
    rewards: torch.Tensor
    dones: torch.Tensor
    next_rows: torch.Tensor
    weights: torch.Tensor
    decision: torch.Tensor  # bool: row is a decision point (first token of an agent turn / each turn)
    asks: torch.Tensor  # bool: that agent turn contains a question mark
    success: torch.Tensor  # bool: the dialogue succeeded (storage.rewards.is_success)

    def __len__(self) -> int:
        return len(self.rewards)

    def to(self, device: str | torch.device) -> FeatureTable:
        """The same table on ``device`` (value steps then never leave it)."""
        return FeatureTable(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
            }
        )


@torch.no_grad()
def build_feature_table(
    hidden_of: Callable[[Sequence[int]], torch.Tensor],
    items: Sequence[EncodedDialogue],
    item_weights: Sequence[float],
    *,
    level: str,
    question_ids: set[int],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> FeatureTable:
    """Keep the frozen trunk's hidden states at the positions ILQL reads, for every dialogue.

    ``hidden_of(indices)`` returns the right-padded last hidden states ``[B, T, d]`` of ``items[indices]``.
    """
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    device: torch.device | None = None
    states, ends, actions, rewards, dones, next_rows, weights, decision, asks, success = ([] for _ in range(10))
    row = 0
    task_id = progress.add_task("features", total=len(items), terms="") if progress else None
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        chunk = [items[i] for i in indices]
        hidden = hidden_of(indices)
        device = hidden.device
        hidden = hidden.to(torch.bfloat16)
        for b, item in enumerate(chunk):
            weight = item_weights[order[start + b]]
            turn_asks = [
                bool(question_ids & set(item.input_ids[s + 1 : e + 1]))
                for s, e in zip(item.turn_state, item.turn_end, strict=True)
            ]
            if level == "utterance":
                n = len(item.turn_end)
                states.append(hidden[b, item.turn_state])
                # the reply's summary: mean hidden state over its tokens (the end token alone may not carry it)
                ends.append(
                    torch.stack(
                        [
                            hidden[b, s + 1 : e + 1].float().mean(0)
                            for s, e in zip(item.turn_state, item.turn_end, strict=True)
                        ]
                    ).to(torch.bfloat16)
                )
                rewards.extend(item.turn_rewards)
                dones.extend(item.turn_dones)
                next_rows.extend([row + k + 1 if not item.turn_dones[k] else -1 for k in range(n)])
                decision.extend([True] * n)
                asks.extend(turn_asks)
            else:
                positions = [j for j, a in enumerate(item.action_mask) if a]
                row_of = {j - 1: row + k for k, j in enumerate(positions)}  # state position → row
                turn_of = {
                    j: k
                    for k, (s, e) in enumerate(zip(item.turn_state, item.turn_end, strict=True))
                    for j in range(s + 1, e + 1)
                }
                states.append(hidden[b, [j - 1 for j in positions]])
                actions.extend(item.input_ids[j] for j in positions)
                rewards.extend(item.rewards[j] for j in positions)
                dones.extend(item.dones[j] for j in positions)
                next_rows.extend(-1 if item.dones[j] else row_of[item.next_state[j]] for j in positions)
                decision.extend(j - 1 == item.turn_state[turn_of[j]] for j in positions)
                asks.extend(turn_asks[turn_of[j]] for j in positions)
                n = len(positions)
            weights.extend([weight] * n)
            success.extend([is_success(item.reward)] * n)
            row += n
        if progress is not None and task_id is not None:
            progress.advance(task_id, len(chunk))
    if progress is not None and task_id is not None:
        progress.remove_task(task_id)
    table = FeatureTable(
        states=torch.cat(states),
        ends=torch.cat(ends) if ends else None,
        actions=torch.tensor(actions, dtype=torch.long) if actions else None,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        dones=torch.tensor(dones, dtype=torch.bool),
        next_rows=torch.tensor(next_rows, dtype=torch.long),
        weights=torch.tensor(weights, dtype=torch.float32),
        decision=torch.tensor(decision, dtype=torch.bool),
        asks=torch.tensor(asks, dtype=torch.bool),
        success=torch.tensor(success, dtype=torch.bool),
    )
    return table.to(device) if device is not None else table


def value_step_loss(
    heads: ValueHeads,
    table: FeatureTable,
    rows: torch.Tensor,
    embedding: torch.Tensor,
    returns: tuple[float, float],
) -> LossTerms:
    """The ILQL value loss on a sample of cached transitions."""
    states = table.states[rows].float()
    next_rows = table.next_rows[rows]
    next_states = table.states[next_rows.clamp(min=0)].float()
    rewards, dones = table.rewards[rows], table.dones[rows]
    if heads.config.level == "utterance":
        assert table.ends is not None
        return utterance_value_loss(heads, states, table.ends[rows].float(), rewards, dones, next_states, returns)
    assert table.actions is not None
    return token_value_loss(heads, embedding, states, table.actions[rows], rewards, dones, next_states, returns)


@torch.no_grad()
def decision_diagnostics(heads: ValueHeads, table: FeatureTable, embedding: torch.Tensor) -> dict[str, float]:
    """Mean Q̄ and V at decision points, split by reply kind (question vs not) and by outcome."""
    rows = table.decision.nonzero().squeeze(-1)[:4096]
    if len(rows) == 0:
        return {}
    states = table.states[rows].float()
    if heads.config.level == "utterance":
        assert table.ends is not None
        pair = torch.cat([table.ends[rows].float(), states], dim=-1)
        q = torch.minimum(heads.target_q1(pair), heads.target_q2(pair))
    else:
        assert table.actions is not None
        actions = table.actions[rows]
        q = torch.minimum(
            heads.target_q1.at(states, actions, embedding), heads.target_q2.at(states, actions, embedding)
        )
    v = heads.v(states)
    out: dict[str, float] = {"V_decision": v.mean().item(), "Q_decision": q.mean().item()}
    for name, mask in (
        ("Q_ask", table.asks[rows]),
        ("Q_act", ~table.asks[rows]),
        ("Q_success", table.success[rows]),
        ("Q_failure", ~table.success[rows]),
    ):
        if mask.any():
            out[name] = q[mask].mean().item()
    return out


# --- data parallelism -----------------------------------------------------------------------------------


@dataclass
class Replicas:
    """This process's place among data-parallel replicas (``accelerate launch``/``torchrun``), or a lone process.

    Every replica holds the whole (small) LoRA model, draws its own batches and averages gradients before each
    optimizer step: DDP's arithmetic with accelerate's process group. The main replica alone saves checkpoints
    and trains the value heads (cheap, on cached features).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def join(cls, device: str) -> Replicas:
        """Join the launched process group when ``WORLD_SIZE`` > 1; otherwise a single replica on ``device``."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(torch.device(resolve_device(device)))
        from accelerate import PartialState

        state = PartialState(cpu=resolve_device(device) == "cpu")
        return cls(state.device, state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        """Whether this replica writes files and logs progress."""
        return self.rank == 0

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the replicas (one all-reduce of the flattened gradients)."""
        if self.world_size == 1:
            return
        with_grad = [p for p in parameters if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in with_grad:
            p.grad.copy_(flat[offset : offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()

    def any(self, flag: bool) -> bool:
        """``flag`` on any replica (so that all of them take the same branch)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def summary(self, parameters: Sequence[torch.nn.Parameter]) -> dict[str, Any]:
        """``world_size`` and, with several replicas, whether their trained weights are still identical."""
        if self.world_size == 1:
            return {"world_size": 1}
        checksum = torch.stack([p.detach().double().sum() for p in parameters]).sum().reshape(1)
        spread = torch.cat([checksum, -checksum]).to(self.device)
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        in_sync = bool((spread[0] + spread[1]).abs().item() <= 1e-9 * max(1.0, abs(checksum.item())))
        return {"world_size": self.world_size, "replicas_in_sync": in_sync}

    def wait(self) -> None:
        """A barrier (no-op for a single replica)."""
        if self.world_size > 1:
            torch.distributed.barrier()


# --- the run ----------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self, limit_minutes: float | None) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + limit_minutes * 60 if limit_minutes else math.inf

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[terms]}"),
        disable=not enabled,
        transient=False,
    )


def _format_terms(terms: dict[str, float], tokens_per_s: float | None = None) -> str:
    text = " ".join(f"{k}={v:.3f}" for k, v in terms.items())
    return f"{text} tok/s={tokens_per_s:.0f}" if tokens_per_s is not None else text


def _resume_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.resume"


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

    ``init_from`` continues from an existing checkpoint's adapter (same base model). An interrupted run with
    the same configuration resumes from its last periodic save. Raises :class:`DatasetError` on unusable data
    and :class:`TrainingError` / :class:`~learning.checkpoint.CheckpointError` on bad configuration.
    """
    out_dir = Path(out_dir)
    task = task or load_task(config.task)
    seed_everything(config.seed)
    clock = _Clock(config.time_limit_minutes)

    replicas = Replicas.join(config.device)  # one process, or this one's place in an `accelerate launch` job
    device = replicas.device
    bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    base = load_base_model(
        config.base_model, cache_dir=Path(config.cache_dir) if config.cache_dir else None, device=device
    )
    tokenizer = base.tokenizer
    encoding = EncodingConfig(max_length=config.max_length, thumbs_weight=config.thumbs_weight)
    needs_reward = config.algorithm != "bc"
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
    resume = _resume_dir(out_dir)
    if (resume / "state.json").is_file():
        saved_state = json.loads((resume / "state.json").read_text())
        if saved_state.get("fingerprint") == config.fingerprint():
            _load_resume(resume, model, heads, optimizer, value_optimizer)
            state = saved_state
            for _ in range(state["step"]):
                scheduler.step()
            sampler.random.setstate(_tuple_state(saved_state["sampler_rng"]))  # the main replica's
            if replicas.rank:
                sampler.random.seed(config.seed * 1_000_003 + replicas.rank * 1009 + state["step"])
            torch.set_rng_state(torch.tensor(saved_state["torch_rng"], dtype=torch.uint8))
            logger.info("resuming from %s at %s step %d", resume, state["stage"], state["step"])
        else:
            logger.warning("ignoring %s: it belongs to a run with other settings", resume)

    def periodic_save() -> None:
        if not replicas.is_main:
            return
        state["fingerprint"] = config.fingerprint()
        state["sampler_rng"] = sampler.random.getstate()
        state["torch_rng"] = torch.get_rng_state().tolist()
        _save_resume(resume, state, model, heads, optimizer, value_optimizer)

    metrics: dict[str, Any] = dict(state.get("metrics", {}))
    interrupted = False
    probes = final_act_probes(task.name, dialogues, [items[i] for i in held_indices], limit=config.probe_states)
    with _progress(progress and replicas.is_main) as bar:
        started = time.monotonic()
        lower = LowerStates.build(
            model,
            [item.input_ids for item in items],
            split=split,
            pad_id=tokenizer.pad_token_id,
            cache_file=lower_cache_file(config, base.model_id, split),
            progress=bar,
        )
        metrics["frozen_layers_seconds"] = round(time.monotonic() - started, 1)
        # --- stage 0 (critic-awr): per-turn critic → advantage weights for the actor ---------------------
        if config.uses_critic and "turn_weights" not in state:
            critic_sampler = MixingSampler(
                train_items,
                batch_size=config.batch_size,
                real_ratio=config.real_ratio,
                source_weights=config.source_weights,
                seed=config.seed + 7919,
            )

            def base_hidden_of(indices: Sequence[int]) -> torch.Tensor:
                adapter = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
                with torch.no_grad(), adapter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    return upper(lower.batch(indices).to(device))

            weights, critic_metrics = train_critic(
                config.critic,
                items,
                held_indices,
                lower,
                upper,
                hidden_size,
                critic_sampler,
                bar,
                clock.deadline,
                base_hidden_of=base_hidden_of,
            )
            state["turn_weights"] = weights
            metrics.update(critic_metrics)
        turn_weights: list[list[float]] | None = state.get("turn_weights")

        # --- stage 1: policy (weighted imitation; joint ILQL adds L_Q + L_V + λ_cql·L_CQL) ----------------
        objective = ImitationObjective(items, turn_weights, sampler.probabilities(), config.batch_size)
        if state["stage"] == "policy" and state["step"] < config.steps and not clock.expired():
            model.train()
            batches = sampler.index_batches()
            task_id = bar.add_task(
                f"{config.resolved_algorithm}: policy", total=config.steps, completed=state["step"], terms=""
            )
            tokens, started = 0, time.monotonic()
            stopper = EarlyStopping(config.patience, lora_params)
            curve: list[dict[str, float]] = metrics.setdefault("held_out_curve", [])
            while state["step"] < config.steps:
                terms: dict[str, float] = {}
                for _ in range(config.grad_accum):
                    indices = next(batches)
                    batch = collate([items[i] for i in indices], tokenizer.pad_token_id).to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        hidden = upper(lower.batch(indices).to(device))
                        loss, terms = _policy_loss(
                            model,
                            hidden,
                            batch,
                            objective.token_weights(indices, batch),
                            objective.normalizer,
                            embedding,
                            heads if joint else None,
                            config,
                            returns,
                        )
                    (loss / config.grad_accum).backward()
                    tokens += batch.num_tokens
                replicas.average_gradients(policy_params)
                torch.nn.utils.clip_grad_norm_(policy_params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if joint and heads is not None:
                    heads.update_targets()
                state["step"] += 1
                rate = tokens / max(time.monotonic() - started, 1e-9)
                metrics.update({f"policy_{k}": v for k, v in terms.items()}, policy_tokens_per_s=rate)
                done = state["step"] >= config.steps
                if held_indices and (state["step"] % config.eval_every == 0 or done):
                    point = {"step": state["step"]}
                    point.update(held_out_loss(model, upper, items, held_indices, lower, objective, embedding, bf16))
                    if probes:
                        point["fit_at_full_knowledge"] = probe_fit_rate(model, tokenizer, probes, task.name, bf16)
                    curve.append(point)
                    logger.info("held out at step %d: %s", state["step"], _format_terms(point))
                    model.train()
                    if stopper.update(point["objective"], state["step"]):
                        logger.info(
                            "early stop at step %d: held-out loss rose %d times", state["step"], config.patience
                        )
                        done = True
                bar.update(task_id, advance=1, terms=_format_terms(terms, rate))
                if state["step"] % 25 == 0:
                    logger.info("policy step %d/%d %s", state["step"], config.steps, _format_terms(terms, rate))
                if state["step"] % config.checkpoint_every == 0 and not done:
                    state["metrics"] = metrics
                    periodic_save()
                if replicas.any(clock.expired()):  # every replica stops at the same step
                    interrupted = True
                    break
                if replicas.any(done):
                    break
            bar.remove_task(task_id)
            if stopper.restore():
                metrics["best_step"] = stopper.best_step
                metrics["held_out_best"] = stopper.best
            if curve:
                metrics.update({f"held_out_{k}": v for k, v in curve[-1].items() if k != "step"})
        if not interrupted and heads is not None and not joint and replicas.is_main:
            # the value stage trains small heads on cached features: the main replica alone does it
            state["stage"] = "value"
        # --- stage 2: value heads on the frozen policy trunk --------------------------------------------
        value_stage = state["stage"] == "value" and heads is not None and value_optimizer is not None
        if value_stage and replicas.is_main and not interrupted:
            model.eval()
            probabilities = sampler.probabilities()
            features_from_base = config.ilql.value_features == "base" and hasattr(model, "disable_adapter")

            def hidden_of(indices: Sequence[int]) -> torch.Tensor:
                adapter = model.disable_adapter() if features_from_base else contextlib.nullcontext()
                with adapter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    return upper(lower.batch(indices).to(device))

            table = build_feature_table(
                hidden_of,
                train_items,
                probabilities,
                level=config.ilql.level,
                question_ids=_question_token_ids(tokenizer),
                progress=bar,
            )
            generator = torch.Generator(device=device).manual_seed(config.seed + state["value_step"])
            task_id = bar.add_task("ilql: value", total=config.value_steps, completed=state["value_step"], terms="")
            started, seen = time.monotonic(), 0
            while state["value_step"] < config.value_steps:
                rows = torch.multinomial(table.weights, config.value_batch_size, replacement=True, generator=generator)
                value_bf16 = config.value_bf16 if config.value_bf16 is not None else config.ilql.level == "token"
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=value_bf16):
                    result = value_step_loss(heads, table, rows, embedding, returns)
                result.loss.backward()
                torch.nn.utils.clip_grad_norm_(heads.trainable_parameters(), 1.0)
                value_optimizer.step()
                value_optimizer.zero_grad(set_to_none=True)
                heads.update_targets()
                state["value_step"] += 1
                seen += len(rows)
                rate = seen / max(time.monotonic() - started, 1e-9)
                metrics.update({f"value_{k}": v for k, v in result.terms.items()}, value_transitions_per_s=rate)
                bar.update(task_id, advance=1, terms=_format_terms(result.terms))
                if state["value_step"] % 250 == 0:
                    logger.info(
                        "value step %d/%d %s", state["value_step"], config.value_steps, _format_terms(result.terms)
                    )
                if state["value_step"] % max(config.checkpoint_every * 5, 1) == 0:
                    state["metrics"] = metrics
                    periodic_save()
                if clock.expired():
                    interrupted = True
                    break
            bar.remove_task(task_id)
            metrics.update(decision_diagnostics(heads, table, embedding))
            logger.info("decision-point diagnostics: %s", {k: round(v, 3) for k, v in metrics.items() if k[0] in "QV"})

    metrics.update(replicas.summary(lora_params))
    metrics.update(
        policy_steps=state["step"],
        value_steps=state["value_step"],
        interrupted_by_time_limit=interrupted,
        return_range=list(returns),
        frozen_layers=split,
        held_out_dialogues=len(held_items),
        train_seconds=round(time.monotonic() - clock.start, 1),
    )
    if heads is not None:
        metrics["heads_parameters"] = heads.parameter_count()
        metrics["heads_bytes"] = heads.size_bytes()
    if replicas.is_main:
        _write_checkpoint(
            out_dir, model, heads, config, base.model_id, metrics, summary, items, hidden_size, embedding.shape[0]
        )
        shutil.rmtree(resume, ignore_errors=True)
    replicas.wait()
    return out_dir


def _attach(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    return attach_lora(
        model, rank=config.lora_rank, alpha=config.lora_alpha, mlp=config.lora_mlp, upper_layers=config.upper_layers
    )


def frozen_layers(model: torch.nn.Module) -> int:
    """How many bottom decoder layers the adapter leaves untouched (their output can be cached)."""
    from peft import PeftModel

    total = num_layers(model)
    if not isinstance(model, PeftModel):
        return total
    adapted = model.peft_config[model.active_adapter].layers_to_transform
    if adapted is None:
        return 0
    return min([adapted] if isinstance(adapted, int) else adapted)


def lower_cache_file(config: TrainConfig, model_id: str, split: int) -> Path | None:
    """Where this base model's frozen-layer states are kept between runs (``None``: not kept)."""
    if not config.feature_cache_dir:
        return None
    key = hashlib.sha256(f"{model_id}:{split}".encode()).hexdigest()[:12]
    return Path(config.feature_cache_dir) / f"lower-{key}.safetensors"


class ImitationObjective:
    """Weighted imitation: every action token of agent turn k weighs ``w_k`` (1 for BC and filtered BC).

    The loss of a batch is ``Σ w·(−log π(a|s)) / normalizer`` with a constant normalizer, the expected weighted
    action tokens of a batch under the sampler (``batch_size · Σ_i p_i · Σ_k w_ik·|u_ik|``). So each action
    token counts the same whatever the batch it lands in: a per-batch mean over tokens would give the tokens
    of short dialogues more weight, and length-grouped batches make that bias large.
    """

    def __init__(
        self,
        items: Sequence[EncodedDialogue],
        turn_weights: Sequence[Sequence[float]] | None,
        probabilities: Sequence[float],
        batch_size: int,
    ) -> None:
        self.items = items
        self.turn_weights = turn_weights
        expected = sum(p * self.weighted_tokens(i) for i, p in enumerate(probabilities))
        self.normalizer = max(batch_size * expected, 1e-9)

    def weights_of(self, index: int) -> list[float]:
        """Per-turn weights of dialogue ``index``."""
        if self.turn_weights is None:
            return [1.0] * len(self.items[index].turn_end)
        return list(self.turn_weights[index])

    def weighted_tokens(self, index: int) -> float:
        """``Σ_k w_k·|u_k|`` of one dialogue."""
        item = self.items[index]
        return sum(
            w * (end - state)
            for w, state, end in zip(self.weights_of(index), item.turn_state, item.turn_end, strict=True)
        )

    def token_weights(self, indices: Sequence[int], batch: Any) -> torch.Tensor:
        """``[B, T]`` weights aligned with the batch's tokens (0 where a token is no action)."""
        weights = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for row, index in enumerate(indices):
            item = self.items[index]
            for w, state, end in zip(self.weights_of(index), item.turn_state, item.turn_end, strict=True):
                weights[row, state + 1 : end + 1] = w
        return weights.to(batch.input_ids.device)


def _policy_loss(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    batch: Any,
    token_weights: torch.Tensor,
    normalizer: float,
    embedding: torch.Tensor,
    heads: ValueHeads | None,
    config: TrainConfig,
    returns: tuple[float, float],
) -> tuple[torch.Tensor, dict[str, float]]:
    """``λ_bc·Σ w·(−log π(a|s)) / normalizer`` over action tokens (logits only there), plus the joint value loss.

    ``hidden`` is the trunk's last hidden state for ``batch``; ``terms["bc"]`` is the unweighted mean NLL.
    """
    mask = batch.action_mask[:, 1:]
    states = hidden[:, :-1][mask]
    actions = batch.input_ids[:, 1:][mask]
    logits = states @ embedding.t() if _tied(model) else _lm_head(model)(states)
    nll = token_nll(logits, actions)
    loss_bc = (token_weights[:, 1:][mask] * nll).sum() / normalizer
    loss = config.ilql.bc_weight * loss_bc
    terms = {"bc": nll.mean().item(), "weighted_bc": loss_bc.item()}
    if heads is not None:  # the paper's joint objective: value gradients reach the trunk
        rows = mask.nonzero()
        next_positions = batch.next_state[:, 1:][mask]
        next_states = hidden[rows[:, 0], next_positions]
        dones = batch.dones[:, 1:][mask]
        rewards = batch.rewards[:, 1:][mask]
        value = token_value_loss(heads, embedding, states, actions, rewards, dones, next_states, returns)
        loss = loss + value.loss
        terms.update(value.terms)
    return loss, terms


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module,
    upper: UpperStack,
    items: Sequence[EncodedDialogue],
    indices: Sequence[int],
    lower: LowerStates,
    objective: ImitationObjective,
    embedding: torch.Tensor,
    bf16: bool,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean NLL per action token (``nll``) and the weighted objective per unit weight (``objective``)."""
    model.eval()
    device = embedding.device
    total_nll = total_weighted = total_weight = 0.0
    count = 0
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        batch = collate([items[i] for i in chunk], 0).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = upper(lower.batch(chunk).to(device))
        action = batch.action_mask[:, 1:]
        states = hidden[:, :-1][action].float()
        logits = states @ embedding.t().float() if _tied(model) else _lm_head(model)(states).float()
        nll = token_nll(logits, batch.input_ids[:, 1:][action])
        weights = objective.token_weights(chunk, batch)[:, 1:][action]
        total_nll += nll.sum().item()
        count += nll.numel()
        total_weighted += (weights * nll).sum().item()
        total_weight += weights.sum().item()
    return {"nll": total_nll / max(count, 1), "objective": total_weighted / max(total_weight, 1e-9)}


def _tied(model: torch.nn.Module) -> bool:
    from learning.lora import causal_lm

    lm = causal_lm(model)
    return (
        lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        and getattr(lm.get_output_embeddings(), "bias", None) is None
    )


def _lm_head(model: torch.nn.Module) -> torch.nn.Module:
    from learning.lora import causal_lm

    return causal_lm(model).get_output_embeddings()


def _question_token_ids(tokenizer: Any) -> set[int]:
    return {i for token, i in tokenizer.get_vocab().items() if "?" in token}


def save_heads(heads: ValueHeads, directory: Path) -> None:
    """Write the value heads' weights (moved to the CPU) as ``heads.safetensors`` in ``directory``."""
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(directory / HEADS_FILE))


def _tuple_state(value: Any) -> Any:
    return tuple(_tuple_state(v) for v in value) if isinstance(value, list) else value


def _save_resume(
    directory: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    heads: ValueHeads | None,
    optimizer: torch.optim.Optimizer,
    value_optimizer: torch.optim.Optimizer | None,
) -> None:
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_lora(model, staging)  # type: ignore[arg-type]
    if heads is not None:
        save_heads(heads, staging)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "value_optimizer": value_optimizer.state_dict() if value_optimizer else None,
        },
        staging / "optimizer.pt",
    )
    (staging / "state.json").write_text(json.dumps(state, default=str))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def _load_resume(
    directory: Path,
    model: torch.nn.Module,
    heads: ValueHeads | None,
    optimizer: torch.optim.Optimizer,
    value_optimizer: torch.optim.Optimizer | None,
) -> None:
    from peft import set_peft_model_state_dict

    adapter = load_file(str(directory / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, adapter)
    if heads is not None and (directory / HEADS_FILE).is_file():
        heads.load_state_dict(load_file(str(directory / HEADS_FILE)))
    saved = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    if value_optimizer is not None and saved.get("value_optimizer"):
        value_optimizer.load_state_dict(saved["value_optimizer"])


def _write_checkpoint(
    out_dir: Path,
    model: torch.nn.Module,
    heads: ValueHeads | None,
    config: TrainConfig,
    base_model_id: str,
    metrics: dict[str, Any],
    summary: Any,
    items: Sequence[EncodedDialogue],
    hidden_size: int,
    vocab_size: int,
) -> Path:
    def write(directory: Path) -> None:
        save_lora(model, directory)  # type: ignore[arg-type]
        if heads is not None:
            save_heads(heads, directory)

    data = summary.to_dict() | _transitions_summary(items)
    path = save_checkpoint(
        out_dir,
        write_files=write,
        base_model=base_model_id,
        algorithm=config.resolved_algorithm,
        config=config.to_dict(),
        metrics=metrics,
        data=data,
        extra={"task": config.task, "hidden_size": hidden_size, "vocab_size": vocab_size, "has_adapter": True},
    )
    heads_file = path / HEADS_FILE
    if heads_file.exists():
        logger.info(
            "value heads: %d parameters, %.1f MB", metrics.get("heads_parameters", 0), heads_file.stat().st_size / 1e6
        )
    return path
