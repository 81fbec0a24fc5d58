"""ILQL (Snell et al. 2022): value heads and losses, readable next to the equations in
docs/architecture.md ("ILQL").

Heads read the base model's last hidden state ``h`` (the LoRA-adapted policy trunk):

* token level: twin ``Q₁, Q₂`` over the vocabulary, their Polyak targets ``Q̄₁, Q̄₂`` and ``V``;
* utterance level (Snell's ``PerUtteranceIQL``): ``Q(s, u)`` from ``[mean h over u's tokens, h(s)]``,
  ``V(s)`` at the token before the turn; one step per agent turn.

Losses on a batch of transitions ``(s, a, r, done, s′)``::

    y      = clip(r + γ·(1 − done)·V(s′), R_min, R_max)              # sg: no gradient through y
    L_Q    = Σᵢ (Qᵢ(s, a) − y)²
    L_V    = |τ − 1{Q̄(s, a) − V(s) < 0}| · (Q̄(s, a) − V(s))²       # Q̄ = min(Q̄₁, Q̄₂), sg
    L_CQL  = Σᵢ (logsumexp_a′ Qᵢ(s, a′) − Qᵢ(s, a))                  # token level only
    L_BC   = −log π(a | s)
    L      = L_Q + L_V + λ_cql·L_CQL + λ_bc·L_BC
    θ̄     ← α·θ + (1 − α)·θ̄                                         # after each optimizer step

Token-level Q heads are *factorized*: ``Qᵢ(s, ·) = E·MLPᵢ(h) + bᵢ`` with ``E`` the frozen output embedding
of the base model, so a head costs ``2d² + |V|`` parameters instead of a ``d→2d→|V|`` MLP's ``2d² + 2d·|V|``;
``Q(s, a)`` for a handful of candidate tokens is a dot product with their embedding rows.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Level = Literal["token", "utterance"]
HeadType = Literal["factorized", "full"]


@dataclass
class ILQLConfig:
    """ILQL hyperparameters (defaults chosen on this machine; the comments give the reference values)."""

    #: "utterance": Q(s, u) per agent turn, decoding reranks sampled replies; "token": Q(s, a) per token, decoding
    #: perturbs the logits (the paper's).
    level: Level = "utterance"
    #: Discount γ per transition.
    gamma: float = 0.99
    #: Expectile τ of the V regression (τ → 1 approaches max_a Q).
    tau: float = 0.7
    #: λ_cql, the CQL weight; the reference 0.1 leaves CQL high on a 49k vocabulary.
    cql_weight: float = 0.5
    #: λ_bc, the imitation weight of the policy stage.
    bc_weight: float = 1.0
    #: Polyak rate α of the target Q heads; the reference 0.005 barely moves targets in a short run.
    polyak: float = 0.05
    #: Token-level decoding: log π + β·(Q̄ − V).
    beta: float = 4.0
    #: Utterance-level decoding: K sampled replies reranked by Q̄(s, u) − V(s).
    candidates: int = 8
    #: Token-level Q head: "factorized" (through the frozen output embedding) or a full vocabulary layer.
    head_type: HeadType = "factorized"
    #: Width of the heads' MLPs as a multiple of the hidden size d.
    head_hidden_mult: int = 2
    #: Token level: the paper's joint loss with value gradients into the LoRA trunk (measured unstable here).
    trunk_grad: bool = False
    #: Which frozen trunk the value heads read: "base" (adapter disabled) or "policy" (the BC-adapted trunk).
    #: BC training compresses away what next-token prediction does not need (which reply was given, once the
    #: next token is the same), so value heads on the policy trunk cannot tell good turns from bad ones.
    value_features: Literal["base", "policy"] = "base"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for manifests."""
        return asdict(self)


class ScalarHead(nn.Module):
    """An MLP ``in → width → width → 1`` (V, and utterance-level Q)."""

    def __init__(self, in_size: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_size, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(features)).squeeze(-1)


class FactorizedQHead(nn.Module):
    """``Q(s, ·) = E·MLP(h)/rms(E) + b`` with ``E`` the frozen output embedding (passed in, never stored).

    Dividing by the embedding's RMS (fixed on first use) gives every model unit-scale token directions, so
    the head's learning speed does not depend on how the base model happened to scale its embeddings.
    """

    def __init__(self, hidden_size: int, vocab_size: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, hidden_size))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.register_buffer("inverse_scale", torch.zeros(()))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _project(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.inverse_scale == 0:
            with torch.no_grad():
                self.inverse_scale.fill_(1.0 / embedding.float().pow(2).mean().sqrt().clamp(min=1e-6).item())
        return self.net(features) * self.inverse_scale

    def all(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``Q(s, a′)`` for every token ``a′``: shape ``[..., |V|]``."""
        return self._project(features, embedding) @ embedding.t() + self.bias

    def at(self, features: torch.Tensor, actions: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``Q(s, a)`` for given tokens; ``actions`` is ``[...]`` (one per state) or ``[..., k]`` (k per state)."""
        projected = self._project(features, embedding)
        rows = embedding[actions]
        if actions.dim() == projected.dim():  # k candidates per state
            return torch.einsum("...d,...kd->...k", projected, rows) + self.bias[actions]
        return (projected * rows).sum(-1) + self.bias[actions]


class FullVocabQHead(nn.Module):
    """The unfactorized head ``d → 2d → |V|`` (trlx's layout), kept for the memory/throughput benchmark."""

    def __init__(self, hidden_size: int, vocab_size: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, vocab_size))

    def all(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def at(self, features: torch.Tensor, actions: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        values = self.net(features)
        if actions.dim() == features.dim():
            return values.gather(-1, actions)
        return values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


class ValueHeads(nn.Module):
    """Twin Q, their Polyak targets and V, for one ILQL level; the targets are never optimized directly."""

    def __init__(self, hidden_size: int, vocab_size: int, config: ILQLConfig) -> None:
        super().__init__()
        self.config = config
        width = config.head_hidden_mult * hidden_size
        if config.level == "token":
            head_class = FactorizedQHead if config.head_type == "factorized" else FullVocabQHead
            self.q1: nn.Module = head_class(hidden_size, vocab_size, width)
            self.q2: nn.Module = head_class(hidden_size, vocab_size, width)
        else:
            self.q1 = ScalarHead(2 * hidden_size, width)
            self.q2 = ScalarHead(2 * hidden_size, width)
        self.target_q1 = copy.deepcopy(self.q1).requires_grad_(False)
        self.target_q2 = copy.deepcopy(self.q2).requires_grad_(False)
        self.v = ScalarHead(hidden_size, width)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (not the targets)."""
        return [*self.q1.parameters(), *self.q2.parameters(), *self.v.parameters()]

    @torch.no_grad()
    def update_targets(self) -> None:
        """``θ̄ ← α·θ + (1 − α)·θ̄`` for both Q heads."""
        polyak_update(self.target_q1, self.q1, self.config.polyak)
        polyak_update(self.target_q2, self.q2, self.config.polyak)

    def parameter_count(self) -> int:
        """All parameters, targets included (what a checkpoint stores)."""
        return sum(p.numel() for p in self.parameters())

    def size_bytes(self) -> int:
        """Bytes of all parameters as stored (float32)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, alpha: float) -> None:
    """Move ``target`` a fraction ``alpha`` of the way towards ``online`` (α = 1 copies)."""
    for target_param, param in zip(target.parameters(), online.parameters(), strict=True):
        target_param.lerp_(param.detach().to(target_param.dtype), alpha)


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """``|τ − 1{diff < 0}|·diff²`` averaged: with τ > ½, V is pushed towards the upper expectile of Q̄."""
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return (weight * diff.pow(2)).mean()


@dataclass
class LossTerms:
    """The total loss and each term (detached floats for logging)."""

    loss: torch.Tensor
    terms: dict[str, float]


def bellman_target(
    reward: torch.Tensor,
    done: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float,
    return_range: tuple[float, float],
) -> torch.Tensor:
    """``clip(r + γ·(1 − done)·V(s′), R_min, R_max)`` without gradient."""
    target = reward + gamma * (~done).float() * next_value.detach().float()
    return target.clamp(*return_range).detach()


def token_value_loss(
    heads: ValueHeads,
    embedding: torch.Tensor,
    states: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    next_states: torch.Tensor,
    return_range: tuple[float, float],
) -> LossTerms:
    """L_Q + L_V + λ_cql·L_CQL for token transitions (features ``[N, d]``, the rest ``[N]``)."""
    config = heads.config
    target = bellman_target(rewards, dones, heads.v(next_states), config.gamma, return_range)
    q1 = heads.q1.at(states, actions, embedding).float()
    q2 = heads.q2.at(states, actions, embedding).float()
    loss_q = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    with torch.no_grad():
        target_q = torch.minimum(
            heads.target_q1.at(states, actions, embedding), heads.target_q2.at(states, actions, embedding)
        ).float()
    v = heads.v(states).float()
    loss_v = expectile_loss(target_q - v, config.tau)
    loss = loss_q + loss_v
    terms = {"q": loss_q.item(), "v": loss_v.item()}
    if config.cql_weight > 0:
        loss_cql = cql_loss(heads.q1.all(states, embedding).float(), q1) + cql_loss(
            heads.q2.all(states, embedding).float(), q2
        )
        loss = loss + config.cql_weight * loss_cql
        terms["cql"] = loss_cql.item()
    terms.update({"Q": q1.mean().item(), "V": v.mean().item(), "target": target.mean().item()})
    return LossTerms(loss, terms)


def cql_loss(all_q: torch.Tensor, taken_q: torch.Tensor) -> torch.Tensor:
    """``logsumexp_a′ Q(s, a′) − Q(s, a)``: pushes down values of tokens the data did not take."""
    return (torch.logsumexp(all_q, dim=-1) - taken_q).mean()


def utterance_value_loss(
    heads: ValueHeads,
    states: torch.Tensor,
    replies: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    next_states: torch.Tensor,
    return_range: tuple[float, float],
) -> LossTerms:
    """L_Q + L_V for utterance transitions: ``Q(s, u)`` from ``[mean h over u, h(s)]``, ``V`` from ``h(s)``
    (``replies``: each reply's mean hidden state over its tokens)."""
    config = heads.config
    target = bellman_target(rewards, dones, heads.v(next_states), config.gamma, return_range)
    pair = torch.cat([replies, states], dim=-1)
    q1, q2 = heads.q1(pair).float(), heads.q2(pair).float()
    loss_q = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    with torch.no_grad():
        target_q = torch.minimum(heads.target_q1(pair), heads.target_q2(pair)).float()
    v = heads.v(states).float()
    loss_v = expectile_loss(target_q - v, config.tau)
    terms = {"q": loss_q.item(), "v": loss_v.item(), "Q": q1.mean().item(), "V": v.mean().item()}
    return LossTerms(loss_q + loss_v, terms)


def token_nll(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``−log π(a | s)`` per action token (``logits [N, |V|]``, ``actions [N]`` → ``[N]``): the BC loss before
    weighting (the trainer sums it with per-token weights over a constant normalizer)."""
    return F.cross_entropy(logits.float(), actions, reduction="none")


def utterance_scores(heads: ValueHeads, states: torch.Tensor, replies: torch.Tensor) -> torch.Tensor:
    """``min(Q̄₁, Q̄₂)(s, u) − V(s)`` for candidate replies (``[N, d]`` each: ``h(s)`` and the reply's mean hidden
    state) — the reranking score."""
    pair = torch.cat([replies, states], dim=-1)
    target_q = torch.minimum(heads.target_q1(pair), heads.target_q2(pair))
    return target_q - heads.v(states)


def token_advantages(
    heads: ValueHeads, embedding: torch.Tensor, states: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """``min(Q̄₁, Q̄₂)(s, a) − V(s)`` for ``k`` candidate tokens per state (``states [B, d]``, ``candidates [B, k]``)."""
    target_q = torch.minimum(
        heads.target_q1.at(states, candidates, embedding), heads.target_q2.at(states, candidates, embedding)
    )
    return target_q - heads.v(states).unsqueeze(-1)
