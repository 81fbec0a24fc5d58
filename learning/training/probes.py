"""A task metric logged during training: does the policy's greedy reply do the right thing at a held-out state?

Two kinds of *probe*, both held-out states of the training data with the hidden persona behind them:

- **act**: the data's agent had learned every preference from the user's answers
  (``TaskWorld.known_from_history`` of the task's compiled world); the greedy reply there should be a final act
  that fits the persona — for travel, a recommendation consistent with everything the traveller already said.
- **question**: the user had given some preferences but not all; the greedy reply there should ask about one
  still open and about nothing already given. Measured on houseplants, an imitation phase stopped by the act
  probe alone ended early (the notes list what fits, so acts are learned fast) and the policy re-asked a given
  value in 49 % of its episodes although its data re-asks in under 2 %.

This is what imitation has to get right for the task to be solvable at all, measured without a simulator and
without the evaluation personas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from imagine.task import TaskSpec
from imagine.world import TaskWorld, TaskWorldError, world_for
from learning.dataset import EncodedDialogue, end_of_turn_id, record_messages
from learning.decoding import DecodeConfig, decode
from storage import DialogueRecord

#: "act": everything is known, the reply must be a fitting final act; "question": something is still open, the
#: reply must ask about an open preference and about none already given.
ProbeKind = Literal["act", "question"]


@dataclass(frozen=True)
class TaskProbe:
    """A state (the training prefix up to the agent's turn), what the reply there must do, and for whom."""

    prompt: list[int]
    kind: ProbeKind
    #: The hidden persona a final act must fit.
    persona: dict[str, Any]
    #: The preferences the user had given by then (a question probe's reply may ask none of them again).
    known: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ProbeFit:
    """Share of the probes of each kind whose greedy reply did the right thing (None: no probe of that kind)."""

    act: float | None
    question: float | None

    def meets(self, target: float) -> bool:
        """Whether every kind that was probed fits at ``target`` or more (and something was probed)."""
        rates = [rate for rate in (self.act, self.question) if rate is not None]
        return bool(rates) and all(rate >= target for rate in rates)

    def as_metrics(self) -> dict[str, float]:
        """The rates under their metric names (``fit_at_full_knowledge``, ``fit_questions``)."""
        named = {"fit_at_full_knowledge": self.act, "fit_questions": self.question}
        return {name: rate for name, rate in named.items() if rate is not None}


def task_probes(
    task_spec: TaskSpec, records: Sequence[DialogueRecord], items: Sequence[EncodedDialogue], *, limit: int
) -> list[TaskProbe]:
    """Up to ``limit`` probes of each kind from ``items`` (encoded from ``records``), at most one of each kind per
    dialogue (more personas, not more turns of one); none when the task's world won't compile."""
    if limit <= 0:
        return []
    try:
        task = world_for(task_spec)
    except TaskWorldError:
        return []
    total = len(task.attribute_names)
    probes: dict[ProbeKind, list[TaskProbe]] = {"act": [], "question": []}
    for item in items:
        record = records[item.origin] if 0 <= item.origin < len(records) else None
        if record is None or not record.persona:
            continue
        # an LLM-imagined persona keeps its values under 'attributes'
        persona = dict(record.persona.get("attributes") or record.persona)
        messages = record_messages(record)
        taken: set[ProbeKind] = set()
        for state, message_index in zip(item.turn_state, item.turn_message, strict=True):
            known = frozenset(task.known_from_history(messages[:message_index]))
            kind: ProbeKind | None = "act" if len(known) == total else "question" if known else None
            if kind is None or kind in taken or len(probes[kind]) >= limit:
                continue
            taken.add(kind)
            probes[kind].append(TaskProbe(item.input_ids[: state + 1], kind, persona, known))
        if all(len(found) >= limit for found in probes.values()):
            break
    return probes["act"] + probes["question"]


def reply_fits(task: TaskWorld, probe: TaskProbe, reply: str) -> bool:
    """Whether ``reply`` does what ``probe`` asks for (see :class:`TaskProbe`)."""
    act = task.final_act(reply)
    if probe.kind == "act":
        return act is not None and task.act_fits(probe.persona, act)
    asked = set(task.asked_attributes(reply))
    return act is None and bool(asked) and not asked & probe.known


def probe_fit(
    model: torch.nn.Module, tokenizer: Any, probes: Sequence[TaskProbe], task_spec: TaskSpec, bf16: bool
) -> ProbeFit:
    """Share of the probes of each kind at which the greedy reply does the right thing."""
    if not probes:
        return ProbeFit(None, None)
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
    fits: dict[ProbeKind, list[bool]] = {"act": [], "question": []}
    for probe, tokens in zip(probes, decoded.tokens, strict=True):
        fits[probe.kind].append(reply_fits(task, probe, tokenizer.decode(tokens, skip_special_tokens=True)))

    def rate(kind: ProbeKind) -> float | None:
        return sum(fits[kind]) / len(fits[kind]) if fits[kind] else None

    return ProbeFit(rate("act"), rate("question"))
