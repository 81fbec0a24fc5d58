"""A task metric logged during training: does the policy act correctly once it knows everything?

A *probe* is a held-out state at which the data's agent had learned every preference from the user's answers
(``TaskWorld.known_from_history`` of the task's compiled world). The policy's
greedy reply there should be a final act that fits the persona — for travel, a recommendation consistent
with everything the traveller already said. This is what imitation has to get right for the task to be
solvable at all, measured without a simulator and without the evaluation personas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from imagine.task import TaskSpec
from imagine.world import TaskWorldError, world_for
from learning.dataset import EncodedDialogue, end_of_turn_id, record_messages
from learning.decoding import DecodeConfig, decode
from storage import DialogueRecord


@dataclass(frozen=True)
class ActProbe:
    """A state (the training prefix up to the agent's turn) and the hidden persona the act must fit."""

    prompt: list[int]
    persona: dict[str, Any]


def final_act_probes(
    task_spec: TaskSpec, records: Sequence[DialogueRecord], items: Sequence[EncodedDialogue], *, limit: int
) -> list[ActProbe]:
    """Up to ``limit`` probes from ``items`` (encoded from ``records``); none when the task's world won't compile."""
    if limit <= 0:
        return []
    try:
        task = world_for(task_spec)
    except TaskWorldError:
        return []
    probes: list[ActProbe] = []
    for item in items:
        record = records[item.origin] if 0 <= item.origin < len(records) else None
        if record is None or not record.persona:
            continue
        messages = record_messages(record)
        for state, message_index in zip(item.turn_state, item.turn_message, strict=True):
            if len(task.known_from_history(messages[:message_index])) == len(task.attribute_names):
                # an LLM-imagined persona keeps its values under 'attributes'
                persona = record.persona.get("attributes") or record.persona
                probes.append(ActProbe(item.input_ids[: state + 1], dict(persona)))
                break  # one probe per dialogue: more personas, not more turns of one
        if len(probes) >= limit:
            break
    return probes


def probe_fit_rate(
    model: torch.nn.Module, tokenizer: Any, probes: Sequence[ActProbe], task_spec: TaskSpec, bf16: bool
) -> float:
    """Share of probes at which the greedy reply is a final act that fits the persona."""
    if not probes:
        return 0.0
    task = world_for(task_spec)
    was_training = model.training
    model.eval()
    end_id = end_of_turn_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    decoded = decode(
        model,
        [probe.prompt for probe in probes],
        end_id=end_id,
        pad_id=pad_id,
        config=DecodeConfig(max_new_tokens=64, temperature=0.0, bf16=bf16),
    )
    model.train(was_training)
    fits = 0
    for probe, tokens in zip(probes, decoded.tokens, strict=True):
        act = task.final_act(tokenizer.decode(tokens, skip_special_tokens=True))
        fits += act is not None and task.act_fits(probe.persona, act)
    return fits / len(probes)
