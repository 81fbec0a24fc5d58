"""Cached frozen-trunk features: which layers are frozen, where their states are kept, and the ILQL value
stage's table of transitions (rows, not padded sequences)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from learning.dataset import EncodedDialogue
from learning.split_trunk import num_layers
from learning.training.config import TrainConfig
from storage.rewards import is_success


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


def question_token_ids(tokenizer: Any) -> set[int]:
    """Token ids containing a question mark (the diagnostics tell asking from acting by them)."""
    return {i for token, i in tokenizer.get_vocab().items() if "?" in token}


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
