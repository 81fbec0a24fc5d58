"""Weighted imitation: the policy loss (``λ_bc·L_BC``, plus the joint ILQL value loss at token level), its
per-token weights, and the held-out loss early stopping reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from learning.dataset import EncodedDialogue, collate
from learning.ilql import ValueHeads, token_nll, token_value_loss
from learning.split_trunk import LowerStates, UpperStack
from learning.training.config import TrainConfig


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


def policy_loss(
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
    logits = states @ embedding.t() if tied_output(model) else lm_head(model)(states)
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
        logits = states @ embedding.t().float() if tied_output(model) else lm_head(model)(states).float()
        nll = token_nll(logits, batch.input_ids[:, 1:][action])
        weights = objective.token_weights(chunk, batch)[:, 1:][action]
        total_nll += nll.sum().item()
        count += nll.numel()
        total_weighted += (weights * nll).sum().item()
        total_weight += weights.sum().item()
    return {"nll": total_nll / max(count, 1), "objective": total_weighted / max(total_weight, 1e-9)}


def tied_output(model: torch.nn.Module) -> bool:
    """Whether the output layer is the input embedding without bias (logits are then ``h @ Eᵀ``)."""
    from learning.lora import causal_lm

    lm = causal_lm(model)
    return (
        lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        and getattr(lm.get_output_embeddings(), "bias", None) is None
    )


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The model's output layer."""
    from learning.lora import causal_lm

    return causal_lm(model).get_output_embeddings()
