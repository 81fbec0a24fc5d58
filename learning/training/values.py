"""The ILQL value stage on cached features: one step's loss and the decision-point diagnostics."""

from __future__ import annotations

import torch

from learning.ilql import LossTerms, ValueHeads, token_value_loss, utterance_value_loss
from learning.training.features import FeatureTable


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
