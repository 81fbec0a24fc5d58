"""A per-turn critic on the frozen lower layers, and the advantage weights it gives the actor.

The critic reads a dialogue the way the policy does — the cached lower-layer states (``learning.split_trunk``)
through its *own* copy of the upper layers with its own LoRA adapter — and predicts, at every agent turn k,

    Q(s_k, u_k) at the last token of the reply u_k   (it has read the history and the reply)
    V(s_k)      at the token before the reply        (it has read the history only)

regressed on the Monte-Carlo return of the dialogue from that turn (γ = 1, as LMRL-Gym's MC critics)::

    G_k   = Σ_{j ≥ k} r_j                              (terminal reward + per-turn 👍/👎 rewards)
    L     = (Q(s_k, u_k) − G_k)² + (V(s_k) − G_k)²

V regresses on the same returns without seeing u_k, so it learns the behaviour data's expected return from
s_k and ``A_k = Q(s_k, u_k) − V(s_k)`` says how much better u_k was than what the data usually did there.
Cross-attention between the reply and the whole history (unlike mean-pooled features) lets Q represent
"this recommendation fits these answers". Held-out dialogues stop training before it memorises outcomes.

The actor is then trained by advantage-weighted regression (Peng et al. 2019), one weight per agent turn::

    w_k = w_floor(d) + min(exp(A_k / T), w_max)         (w_floor: the reference's imitation, see CriticConfig)
    L_actor = Σ_k w_k · (−log π(u_k | s_k))            (summed over u_k's tokens)

where w_floor(d) is ``bc_floor`` for the turns of a dialogue d the actor imitates unconditionally — its
reference: the successful dialogues (filtered BC) by default, or all of them (BC) — and 0 for the others, whose
turns count only as far as the critic rates them above the data's average.

which distils "do what the critic prefers" into the LoRA policy itself: serving decodes one reply at the cost
of BC, with no value heads and no reranking.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import inject_adapter_in_model
from rich.progress import Progress
from torch import nn

from learning.cpus import follow_cpu_affinity
from learning.dataset import EncodedDialogue, MixingSampler
from learning.ilql import ScalarHead
from learning.lora import lora_config
from learning.split_trunk import LowerStates, UpperStack
from learning.training.optim import EarlyStopping, warmup_cosine
from storage.rewards import SUCCESS_THRESHOLD, is_success

logger = logging.getLogger(__name__)


@dataclass
class CriticConfig:
    """The per-turn critic and the advantage weighting of the actor (``critic-awr``)."""

    #: "frozen": small heads on the base model's features, computed once (Q reads the state and the reply's mean
    #: hidden state); "adapted": the critic's own LoRA on a copy of the upper layers, trained end to end.
    features: Literal["frozen", "adapted"] = "frozen"
    #: Critic optimizer steps at most with "adapted" features (early stopping on held-out MSE may end sooner).
    steps: int = 300
    #: The same with "frozen" features: their steps cost only the heads, so they take many more.
    frozen_steps: int = 3000
    #: Agent turns per frozen-feature critic step.
    frozen_batch_size: int = 256
    #: Critic learning rate (LoRA and heads), warm-up then cosine decay.
    lr: float = 1e-3
    #: The critic's LoRA rank (its adapter is its own, on a copy of the upper layers).
    lora_rank: int = 16
    #: The critic's LoRA alpha (scale alpha / rank).
    lora_alpha: int = 32
    #: AWR temperature T: a turn with advantage A weighs exp(A/T); returns are in [0, 1], so 0.1 makes a
    #: 0.3 better reply count e³ ≈ 20 times more.
    temperature: float = 0.1
    #: Largest weight of one turn (keeps one lucky estimate from dominating the actor's loss).
    max_weight: float = 20.0
    #: Imitation weight every turn of a reference dialogue keeps (w = floor + min(exp(A/T), w_max)), so that turns
    #: the critic cannot judge — a final act it cannot tell right from wrong — are still imitated. Measured on
    #: travel: without it (floor 0) a critic that rates every recommendation below average left the actor 6 % of
    #: the weight on recommendations and it stopped recommending.
    bc_floor: float = 1.0
    #: The behaviour the actor imitates unconditionally: "fbc" (the successful dialogues: the imitation phase
    #: trains on them alone and only their turns keep ``bc_floor``) or "bc" (every dialogue). Measured by
    #: bench/rl_vs_bc.py with probe-stopped imitation: from "bc", critic-awr reached 78.0 % on travel where
    #: filtered BC alone reached 93.0 % — imitating failed dialogues at weight ≥ 1 pulls the actor back towards
    #: the data's 37 %; on teaching it led filtered BC (66.5 % vs 59.5 %). From "fbc": 98.0 % on travel (FBC 93.0 %
    #: on one CPU, 61.5 % on another: 98.0 % on both) and 90.0 % on teaching (FBC 59.5 %), 200 held-out episodes each.
    reference: Literal["bc", "fbc"] = "fbc"
    #: Critic steps between held-out evaluations.
    eval_every: int = 50
    #: Held-out evaluations without improvement before the critic stops.
    patience: int = 3
    #: Actor (AWR) steps. Trained from the base model, critic-awr first imitates its reference (at most
    #: ``TrainConfig.steps`` steps, until the task probe fits) and then runs these from that adapter, with no warm-up
    #: — the recipe bench/rl_vs_bc.py measured (BC 400 then AWR 200: 94.5 % on travel). Continuing from a trained
    #: policy (``init_from``) runs these alone. The actor's learning rate is the adapter's: from one BC adapter
    #: (travel, fit 79 %) lr 1e-3 and 3e-4 gave 70 % and 65 % on 100 development episodes, and both lost probe fit
    #: in their first 50 steps (to 17 % and 46 %) — the dip comes from the reweighted objective, not the step size.
    actor_steps: int = 200


def turn_returns(item: EncodedDialogue) -> list[float]:
    """``G_k = Σ_{j ≥ k} r_j`` for each agent turn of ``item`` (undiscounted Monte-Carlo returns)."""
    returns: list[float] = []
    total = 0.0
    for reward in reversed(item.turn_rewards):
        total += reward
        returns.append(total)
    return returns[::-1]


class TurnCritic(nn.Module):
    """``Q(s, u)`` and ``V(s)`` per agent turn, from an independent LoRA-adapted copy of the upper layers."""

    def __init__(self, upper: UpperStack, hidden_size: int, *, rank: int, alpha: int, mlp: bool) -> None:
        super().__init__()
        self.trunk = upper.copy()
        _strip_adapters(self.trunk)  # the critic starts from the base weights, not the actor's adapter
        config = lora_config(rank=rank, alpha=alpha, mlp=mlp)
        inject_adapter_in_model(config, self.trunk)
        for name, parameter in self.trunk.named_parameters():
            parameter.requires_grad_("lora_" in name)
        # The final-norm hidden states of a language model have a few very large dimensions; normalising them
        # before the heads keeps the regression stable (without it the held-out MSE diverged at lr 1e-3).
        self.q = nn.Sequential(nn.LayerNorm(hidden_size), ScalarHead(hidden_size, 2 * hidden_size))
        self.v = nn.Sequential(nn.LayerNorm(hidden_size), ScalarHead(hidden_size, 2 * hidden_size))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights of the copied layers and both heads."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self, items: Sequence[EncodedDialogue], indices: Sequence[int], lower: LowerStates
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, V)`` for every agent turn of the dialogues ``indices`` (flattened in order), ``[N]`` each."""
        out = self.trunk(lower.batch(indices).to(self.q[0].weight.device))
        rows, states, ends = [], [], []
        for row, index in enumerate(indices):
            item = items[index]
            rows.extend([row] * len(item.turn_end))
            states.extend(item.turn_state)
            ends.extend(item.turn_end)
        row_index = torch.tensor(rows, device=out.device)
        q = self.q(out[row_index, torch.tensor(ends, device=out.device)])
        v = self.v(out[row_index, torch.tensor(states, device=out.device)])
        return q, v


def _strip_adapters(module: nn.Module) -> None:
    """Replace every peft LoRA wrapper inside ``module`` by the plain layer it wraps (in place)."""
    for name, child in list(module.named_children()):
        base_layer = getattr(child, "base_layer", None)
        if isinstance(base_layer, nn.Module) and hasattr(child, "lora_A"):
            setattr(module, name, base_layer)
        else:
            _strip_adapters(child)


def critic_loss(
    critic: TurnCritic, items: Sequence[EncodedDialogue], indices: Sequence[int], lower: LowerStates
) -> tuple[torch.Tensor, dict[str, float]]:
    """``mean (Q − G)² + mean (V − G)²`` over the agent turns of dialogues ``indices``."""
    q, v = critic(items, indices, lower)
    targets = torch.tensor([g for i in indices for g in turn_returns(items[i])], device=q.device)
    loss_q, loss_v = F.mse_loss(q, targets), F.mse_loss(v, targets)
    return loss_q + loss_v, {"q_mse": loss_q.item(), "v_mse": loss_v.item()}


@dataclass(frozen=True)
class AdvantageWeights:
    """Per-turn AWR weights ``floor + min(exp(A/T), w_max)`` of every dialogue, and the advantages behind them."""

    advantages: list[list[float]]
    weights: list[list[float]]

    @classmethod
    def from_advantages(
        cls,
        advantages: list[list[float]],
        temperature: float,
        max_weight: float,
        floors: Sequence[float],
    ) -> AdvantageWeights:
        """Turn advantages into weights ``floor + min(exp(A/T), w_max)``, with one floor per dialogue."""
        weights = [
            [floor + min(math.exp(min(a / temperature, 50.0)), max_weight) for a in per_turn]
            for per_turn, floor in zip(advantages, floors, strict=True)
        ]
        return cls(advantages, weights)


def imitation_floors(config: CriticConfig, items: Sequence[EncodedDialogue], min_reward: float) -> list[float]:
    """Each dialogue's imitation floor: ``bc_floor`` where it belongs to ``config.reference``, else 0.
    ``min_reward`` is the filtered-BC threshold (``TrainConfig.fbc_min_reward``), so that the "fbc" reference is
    exactly the data the imitation phase trained on."""
    return [
        config.bc_floor if config.reference == "bc" or (item.reward is not None and item.reward >= min_reward) else 0.0
        for item in items
    ]


@torch.no_grad()
def turn_advantages(
    critic: TurnCritic, items: Sequence[EncodedDialogue], lower: LowerStates, batch_size: int = 16
) -> list[list[float]]:
    """``A_k = Q(s_k, u_k) − V(s_k)`` for every agent turn of every dialogue (eval mode, no gradient)."""
    critic.eval()
    advantages: list[list[float]] = []
    for start in range(0, len(items), batch_size):
        indices = list(range(start, min(start + batch_size, len(items))))
        q, v = critic(items, indices, lower)
        flat = (q - v).tolist()
        offset = 0
        for index in indices:
            n = len(items[index].turn_end)
            advantages.append(flat[offset : offset + n])
            offset += n
    critic.train()
    return advantages


@torch.no_grad()
def held_out_mse(
    critic: TurnCritic, items: Sequence[EncodedDialogue], indices: Sequence[int], lower: LowerStates
) -> dict[str, float]:
    """Q and V mean squared errors over the agent turns of ``indices`` (eval mode)."""
    critic.eval()
    totals = {"q_mse": 0.0, "v_mse": 0.0}
    turns = 0
    for start in range(0, len(indices), 16):
        chunk = list(indices[start : start + 16])
        _, terms = critic_loss(critic, items, chunk, lower)
        n = sum(len(items[i].turn_end) for i in chunk)
        for key in totals:
            totals[key] += terms[key] * n
        turns += n
    critic.train()
    return {key: value / max(turns, 1) for key, value in totals.items()}


class FrozenFeatureCritic(nn.Module):
    """``Q(s, u)`` from ``[h(s), mean h(u)]`` and ``V(s)`` from ``h(s)``: small heads on features computed once."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.q = nn.Sequential(nn.LayerNorm(2 * hidden_size), ScalarHead(2 * hidden_size, 2 * hidden_size))
        self.v = nn.Sequential(nn.LayerNorm(hidden_size), ScalarHead(hidden_size, 2 * hidden_size))

    def forward(self, states: torch.Tensor, replies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, V)`` for ``[N, d]`` state features and ``[N, d]`` reply features."""
        return self.q(torch.cat([states, replies], dim=-1)), self.v(states)


@torch.no_grad()
def turn_features(
    hidden_of: Callable[[Sequence[int]], torch.Tensor], items: Sequence[EncodedDialogue], batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Per agent turn of every dialogue (in order): state feature ``h(s)``, the reply's mean hidden state, the
    Monte-Carlo return; and each dialogue's first row. ``hidden_of(indices)`` gives ``[B, T, d]`` hidden states."""
    states, replies, returns, first_rows = [], [], [], []
    rows = 0
    for start in range(0, len(items), batch_size):
        follow_cpu_affinity()
        indices = list(range(start, min(start + batch_size, len(items))))
        hidden = hidden_of(indices).float()
        for row, index in enumerate(indices):
            item = items[index]
            first_rows.append(rows)
            for state, end in zip(item.turn_state, item.turn_end, strict=True):
                states.append(hidden[row, state])
                replies.append(hidden[row, state + 1 : end + 1].mean(0))
            returns.extend(turn_returns(item))
            rows += len(item.turn_end)
    return torch.stack(states), torch.stack(replies), torch.tensor(returns), first_rows


def _train_frozen_critic(
    config: CriticConfig,
    items: Sequence[EncodedDialogue],
    held_indices: Sequence[int],
    hidden_of: Callable[[Sequence[int]], torch.Tensor],
    hidden_size: int,
    probabilities: Sequence[float],
    progress: Progress | None,
) -> tuple[list[list[float]], dict[str, Any]]:
    """Frozen-feature critic: features once, then many cheap head steps; returns per-turn advantages."""
    states, replies, returns, first_rows = turn_features(hidden_of, items)
    held = set(held_indices)
    row_item = [i for i, item in enumerate(items) for _ in item.turn_end]
    train_rows = torch.tensor([r for r, i in enumerate(row_item) if i not in held])
    held_rows = torch.tensor([r for r, i in enumerate(row_item) if i in held])
    # rows drawn as the mixing sampler draws their dialogues (real vs imagined ratio, source weights)
    row_weights = torch.tensor(
        [probabilities[row_item[r]] if row_item[r] < len(probabilities) else 0.0 for r in train_rows.tolist()]
    )
    critic = FrozenFeatureCritic(hidden_size)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    stopper = EarlyStopping(config.patience, critic.parameters(), min_delta=1e-5)
    curve: list[dict[str, float]] = []
    task_id = progress.add_task("critic", total=config.frozen_steps, terms="") if progress else None
    step = 0
    for step in range(1, config.frozen_steps + 1):
        rows = train_rows[
            torch.multinomial(row_weights, config.frozen_batch_size, replacement=True, generator=generator)
        ]
        q, v = critic(states[rows], replies[rows])
        loss = F.mse_loss(q, returns[rows]) + F.mse_loss(v, returns[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None and task_id is not None:
            progress.update(task_id, advance=1, terms=f"loss={loss.item():.3f}")
        if len(held_rows) and step % (config.eval_every * 4) == 0:
            with torch.no_grad():
                q, v = critic(states[held_rows], replies[held_rows])
                point = {
                    "step": float(step),
                    "q_mse": F.mse_loss(q, returns[held_rows]).item(),
                    "v_mse": F.mse_loss(v, returns[held_rows]).item(),
                }
            curve.append(point)
            if stopper.update(point["q_mse"] + point["v_mse"], step):
                break
    if progress is not None and task_id is not None:
        progress.remove_task(task_id)
    stopper.restore()
    with torch.no_grad():
        q, v = critic(states, replies)
    flat = (q - v).tolist()
    advantages = [flat[first : first + len(item.turn_end)] for first, item in zip(first_rows, items, strict=True)]
    return advantages, {"critic_steps": step, "critic_best_step": stopper.best_step, "critic_curve": curve}


def train_critic(
    config: CriticConfig,
    items: Sequence[EncodedDialogue],
    held_indices: Sequence[int],
    lower: LowerStates,
    upper: UpperStack,
    hidden_size: int,
    sampler: MixingSampler,
    progress: Progress | None = None,
    deadline: float = math.inf,
    base_hidden_of: Callable[[Sequence[int]], torch.Tensor] | None = None,
    min_reward: float = SUCCESS_THRESHOLD,
) -> tuple[list[list[float]], dict[str, Any]]:
    """Train the per-turn critic, then return every dialogue's per-turn AWR weights and the critic's metrics.

    ``sampler`` draws training dialogues (indices into ``items``); ``held_indices`` are never trained on and
    stop training when their MSE stops falling. ``deadline`` is a ``time.monotonic()`` value.
    ``base_hidden_of(indices)`` gives the base model's last hidden states (frozen-feature critic).
    ``min_reward``: the terminal reward from which a dialogue belongs to the filtered-BC reference.
    """
    started = time.monotonic()
    if config.features == "frozen":
        if base_hidden_of is None:
            raise ValueError("the frozen-feature critic needs base_hidden_of")
        advantages, metrics = _train_frozen_critic(
            config, items, held_indices, base_hidden_of, hidden_size, sampler.probabilities(), progress
        )
    else:
        advantages, metrics = _train_adapted_critic(
            config, items, held_indices, lower, upper, hidden_size, sampler, progress, deadline
        )
    weights = AdvantageWeights.from_advantages(
        advantages, config.temperature, config.max_weight, imitation_floors(config, items, min_reward)
    )
    metrics["critic_seconds"] = round(time.monotonic() - started, 1)
    metrics.update(advantage_diagnostics(items, advantages, weights.weights, held_indices))
    logger.info("critic: %s", {k: v for k, v in metrics.items() if k != "critic_curve"})
    return weights.weights, metrics


def _train_adapted_critic(
    config: CriticConfig,
    items: Sequence[EncodedDialogue],
    held_indices: Sequence[int],
    lower: LowerStates,
    upper: UpperStack,
    hidden_size: int,
    sampler: MixingSampler,
    progress: Progress | None,
    deadline: float,
) -> tuple[list[list[float]], dict[str, Any]]:
    """The critic with its own LoRA on a copy of the upper layers, trained end to end; returns every turn's
    advantage and the training metrics."""
    device = lower.states[0].device
    critic = TurnCritic(upper, hidden_size, rank=config.lora_rank, alpha=config.lora_alpha, mlp=True).to(device)
    critic.train()
    parameters = critic.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    scheduler = warmup_cosine(optimizer, config.steps, 0.05)
    stopper = EarlyStopping(config.patience, critic.parameters(), min_delta=1e-5)
    batches = sampler.index_batches()
    curve: list[dict[str, float]] = []
    task_id = progress.add_task("critic", total=config.steps, terms="") if progress else None
    step = 0
    for step in range(1, config.steps + 1):
        loss, terms = critic_loss(critic, items, next(batches), lower)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None and task_id is not None:
            progress.update(task_id, advance=1, terms=" ".join(f"{k}={v:.3f}" for k, v in terms.items()))
        stop = time.monotonic() > deadline
        if held_indices and (step % config.eval_every == 0 or step == config.steps):
            point = {"step": float(step), **held_out_mse(critic, items, held_indices, lower)}
            curve.append(point)
            logger.info("critic held out at step %d: q_mse=%.4f v_mse=%.4f", step, point["q_mse"], point["v_mse"])
            stop = stopper.update(point["q_mse"] + point["v_mse"], step) or stop
        if stop:
            break
    if progress is not None and task_id is not None:
        progress.remove_task(task_id)
    stopper.restore()
    metrics: dict[str, Any] = {"critic_steps": step, "critic_best_step": stopper.best_step, "critic_curve": curve}
    return turn_advantages(critic, items, lower), metrics


def advantage_diagnostics(
    items: Sequence[EncodedDialogue],
    advantages: Sequence[Sequence[float]],
    weights: Sequence[Sequence[float]],
    held_indices: Sequence[int],
) -> dict[str, float]:
    """Mean advantage of turns in successful vs failed training dialogues, of final vs earlier turns, and the
    share of the actor's weight each group gets (to read what the critic prefers)."""
    held = set(held_indices)
    groups: dict[str, list[tuple[float, float]]] = {"success": [], "failure": [], "last_turn": [], "earlier": []}
    for index, item in enumerate(items):
        if index in held:
            continue
        for k, (a, w) in enumerate(zip(advantages[index], weights[index], strict=True)):
            groups["success" if is_success(item.reward) else "failure"].append((a, w))
            groups["last_turn" if k == len(item.turn_end) - 1 else "earlier"].append((a, w))
    total_weight = sum(w for a, w in groups["success"] + groups["failure"]) or 1.0
    out: dict[str, float] = {}
    for name, values in groups.items():
        if values:
            out[f"A_{name}"] = sum(a for a, _ in values) / len(values)
            out[f"weight_share_{name}"] = sum(w for _, w in values) / total_weight
    return out
