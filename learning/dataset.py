"""Dialogues → token ids, action masks, rewards and transitions for BC, filtered BC and ILQL.

A dialogue is rendered with the base model's chat template: the task's system prompt, then user turns as
``user`` and agent turns as ``assistant`` messages. Agent tokens are actions (the turn's text and its
end-of-turn token); everything else (system prompt, role headers, user text) is observation.

Transitions, by token index ``j`` of an action token (its state is the prefix ending at ``j - 1``):

* inside an agent turn, ``s′`` is the prefix ending at ``j`` (the next token's state);
* after the last token of an agent turn, ``s′`` is the state just before the first token of the *next*
  agent turn: the user's reply is part of the transition, never an action;
* after the last agent token of the dialogue ``done = 1`` and ``V(s′) = 0``.

The terminal reward sits on the last agent token; optional per-turn rewards (👍/👎) sit on the last token
of their turn. Utterance-level transitions are the same with one step per agent turn.

A leading agent message (the task's opening line, sent by the bot itself) is context, not an action. Every user
turn carries the agent's note (:mod:`learning.notes`), exactly as the policy reads it when serving.
Sequences longer than ``max_length`` lose whole turns from the start (the system prompt always stays).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from imagine.task import TaskSpec
from learning.interface import Message
from learning.notes import with_notes
from storage import DialogueRecord
from storage.rewards import is_success

logger = logging.getLogger(__name__)

ROLE_NAMES = {"user": "user", "agent": "assistant"}


class DatasetError(ValueError):
    """Training data that cannot be used (empty, no rewards, every dialogue too long); the message says why."""


@dataclass(frozen=True)
class EncodedDialogue:
    """One dialogue as token-level and utterance-level transitions (all lists have one entry per token/turn).

    Token level (aligned with ``input_ids``): ``action_mask[j]`` marks action tokens; for an action token
    ``j`` the state is index ``j - 1``, ``rewards[j]`` its reward, ``dones[j]`` whether the episode ends
    after it and ``next_state[j]`` the index whose hidden state is ``s′`` (``-1`` when done).

    Utterance level (one entry per agent turn that is an action): ``turn_state`` is the index of the last
    token before the turn's first action token (``s``), ``turn_end`` the index of its last action token
    (where ``Q(s, u)`` is read), ``turn_rewards``/``turn_dones`` as above; ``s′`` is the next turn's state.
    """

    input_ids: list[int]
    action_mask: list[bool]
    rewards: list[float]
    dones: list[bool]
    next_state: list[int]
    turn_state: list[int]
    turn_end: list[int]
    turn_rewards: list[float]
    turn_dones: list[bool]
    reward: float | None
    source: str
    truncated_turns: int = 0
    #: For each agent turn above, the index of its message in the dialogue's turns.
    turn_message: list[int] = field(default_factory=list)
    #: Index of the record this dialogue was encoded from (in the list given to :func:`encode_records`).
    origin: int = -1

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_actions(self) -> int:
        """How many action tokens this dialogue has."""
        return sum(self.action_mask)


@dataclass
class DatasetSummary:
    """What went into a training set: counts per source, rewards, tokens and what was dropped (and why)."""

    dialogues: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    with_reward: int = 0
    mean_reward: float | None = None
    success_rate: float | None = None
    tokens: int = 0
    action_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in checkpoint manifests)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class EncodingConfig:
    """How dialogues become sequences."""

    max_length: int = 512
    thumbs_weight: float = 0.25  # per-turn reward = weight × mean thumbs (−1..1) on that agent turn
    opening_is_context: bool = True


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def clean_text(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """User-supplied text with the tokenizer's special-token strings removed (no role injection)."""
    for special in tokenizer.all_special_tokens:
        if special:
            text = text.replace(special, "")
    return text.strip()


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an agent turn (ChatML's ``<|im_end|>``, else EOS)."""
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id is not None:
        return token_id
    if tokenizer.eos_token_id is None:
        raise DatasetError("the tokenizer has neither <|im_end|> nor an EOS token to end agent turns")
    return int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class _Segment:
    ids: list[int]
    actions: list[bool]
    agent_turn: int | None  # index of the agent turn among the dialogue's turns, if this segment is one


def _segments(
    tokenizer: PreTrainedTokenizerBase, system_prompt: str, turns: Sequence[Message], opening_is_context: bool
) -> list[_Segment]:
    """Token segments: the system prompt, then one segment per turn (agent turns mark their action tokens)."""
    eot = end_of_turn_id(tokenizer)
    messages = [{"role": "system", "content": system_prompt}]
    previous = _render(tokenizer, messages, False)
    segments = [_Segment(tokenizer.encode(previous, add_special_tokens=False), [], None)]
    segments[0] = _Segment(segments[0].ids, [False] * len(segments[0].ids), None)
    for index, turn in enumerate(turns):
        if turn.role == "agent":
            header = _render(tokenizer, messages, True)[len(previous) :]
        messages.append({"role": ROLE_NAMES[turn.role], "content": clean_text(tokenizer, turn.text)})
        rendered = _render(tokenizer, messages, False)
        piece = rendered[len(previous) :]
        previous = rendered
        is_action = turn.role == "agent" and not (index == 0 and opening_is_context)
        if turn.role != "agent":
            ids = tokenizer.encode(piece, add_special_tokens=False)
            segments.append(_Segment(ids, [False] * len(ids), None))
            continue
        if not piece.startswith(header):
            raise DatasetError("the chat template renders an assistant turn without its generation prompt")
        header_ids = tokenizer.encode(header, add_special_tokens=False)
        body_ids = tokenizer.encode(piece[len(header) :], add_special_tokens=False)
        # Actions: the reply text and the token that ends it; whatever the template adds after is context.
        cut = body_ids.index(eot) + 1 if eot in body_ids else len(body_ids)
        actions = [False] * len(header_ids) + [is_action] * cut + [False] * (len(body_ids) - cut)
        segments.append(_Segment(header_ids + body_ids, actions, index if is_action else None))
    return segments


def encode_dialogue(
    tokenizer: PreTrainedTokenizerBase,
    system_prompt: str,
    turns: Sequence[Message],
    *,
    reward: float | None,
    turn_rewards: Mapping[int, float] | None = None,
    source: str = "imagined",
    config: EncodingConfig = EncodingConfig(),
) -> EncodedDialogue:
    """Encode one dialogue; ``turn_rewards`` maps a turn index to an extra reward on that agent turn.

    Raises :class:`DatasetError` when the dialogue has no agent action or its last agent turn alone does
    not fit into ``config.max_length``.
    """
    segments = _segments(tokenizer, system_prompt, turns, config.opening_is_context)
    action_segments = [i for i, s in enumerate(segments) if s.agent_turn is not None]
    if not action_segments:
        raise DatasetError("dialogue has no agent turn to learn from")
    # Drop whole turns from the start (after the system prompt) until it fits; never cut the last action.
    first, dropped = 1, 0
    while sum(len(s.ids) for s in segments[:1] + segments[first:]) > config.max_length:
        if first >= action_segments[-1]:
            raise DatasetError(f"the last agent turn does not fit into max_length={config.max_length} tokens")
        first += 1
        dropped += 1
    kept = segments[:1] + segments[first:]

    input_ids: list[int] = []
    action_mask: list[bool] = []
    turn_spans: list[tuple[int, int, int]] = []  # (first action index, last action index, turn index)
    for segment in kept:
        offset = len(input_ids)
        input_ids.extend(segment.ids)
        action_mask.extend(segment.actions)
        if segment.agent_turn is not None:
            positions = [offset + i for i, a in enumerate(segment.actions) if a]
            if positions:
                turn_spans.append((positions[0], positions[-1], segment.agent_turn))
    if not turn_spans:
        raise DatasetError("dialogue has no agent action left after truncation")

    length = len(input_ids)
    rewards = [0.0] * length
    dones = [False] * length
    next_state = [-1] * length
    turn_rewards = turn_rewards or {}
    step_rewards: list[float] = []
    for k, (start, end, turn_index) in enumerate(turn_spans):
        for j in range(start, end):
            next_state[j] = j
        step_reward = float(turn_rewards.get(turn_index, 0.0))
        if k + 1 < len(turn_spans):
            next_state[end] = turn_spans[k + 1][0] - 1
        else:
            dones[end] = True
            step_reward += float(reward or 0.0)
        rewards[end] = step_reward
        step_rewards.append(step_reward)
    return EncodedDialogue(
        input_ids=input_ids,
        action_mask=action_mask,
        rewards=rewards,
        dones=dones,
        next_state=next_state,
        turn_state=[start - 1 for start, _, _ in turn_spans],
        turn_end=[end for _, end, _ in turn_spans],
        turn_rewards=step_rewards,
        turn_dones=[k == len(turn_spans) - 1 for k in range(len(turn_spans))],
        reward=reward,
        source=source,
        truncated_turns=dropped,
        turn_message=[turn_index for _, _, turn_index in turn_spans],
    )


def record_messages(record: DialogueRecord) -> list[Message]:
    """A stored dialogue's turns as policy messages."""
    return [Message(role="agent" if t.role == "agent" else "user", text=t.text) for t in record.turns]


def encode_records(
    records: Sequence[DialogueRecord],
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    *,
    config: EncodingConfig = EncodingConfig(),
    require_reward: bool = True,
    min_reward: float | None = None,
) -> tuple[list[EncodedDialogue], DatasetSummary]:
    """Encode stored dialogues; unusable ones are counted in the summary's ``dropped``, never fatal alone.

    ``require_reward`` drops dialogues without a terminal reward (RL, filtered BC); ``min_reward`` keeps
    only dialogues with at least that reward (filtered BC). Raises :class:`DatasetError` when nothing is left.
    """
    summary = DatasetSummary()
    encoded: list[EncodedDialogue] = []

    def drop(reason: str) -> None:
        summary.dropped[reason] = summary.dropped.get(reason, 0) + 1

    if not records:
        raise DatasetError("the dataset is empty: no dialogues to train on")
    if require_reward and all(r.reward is None for r in records):
        raise DatasetError(f"none of the {len(records)} dialogues has a reward; RL and filtered BC need rewards")
    for origin, record in enumerate(records):
        if require_reward and record.reward is None:
            drop("no reward")
            continue
        if min_reward is not None and (record.reward is None or record.reward < min_reward):
            drop(f"reward below {min_reward}")
            continue
        thumbs = {
            i: config.thumbs_weight * t.thumbs
            for i, t in enumerate(record.turns)
            if t.role == "agent" and t.thumbs is not None and config.thumbs_weight
        }
        try:
            item = encode_dialogue(
                tokenizer,
                task.system_prompt,
                with_notes(task, record_messages(record)),
                reward=record.reward,
                turn_rewards=thumbs,
                source=record.source,
                config=config,
            )
        except DatasetError as error:
            drop(str(error))
            continue
        encoded.append(dataclasses.replace(item, origin=origin))
    if not encoded:
        reasons = "; ".join(f"{n}× {why}" for why, n in summary.dropped.items())
        raise DatasetError(f"no usable dialogue among {len(records)}: {reasons}")
    rewards = [e.reward for e in encoded if e.reward is not None]
    summary.dialogues = len(encoded)
    for item in encoded:
        summary.by_source[item.source] = summary.by_source.get(item.source, 0) + 1
    summary.with_reward = len(rewards)
    summary.mean_reward = sum(rewards) / len(rewards) if rewards else None
    summary.success_rate = sum(is_success(r) for r in rewards) / len(rewards) if rewards else None
    summary.tokens = sum(len(e) for e in encoded)
    summary.action_tokens = sum(e.num_actions for e in encoded)
    summary.truncated = sum(e.truncated_turns > 0 for e in encoded)
    return encoded, summary


def split_held_out(
    items: Sequence[EncodedDialogue], fraction: float, seed: int
) -> tuple[list[EncodedDialogue], list[EncodedDialogue]]:
    """``(train, held_out)``: a seeded ``fraction`` of the dialogues (at least one, when there are ten or more)
    kept out of training to measure generalisation and stop early; fewer than ten dialogues are all trained on."""
    if fraction <= 0 or len(items) < 10:
        return list(items), []
    count = max(1, round(len(items) * fraction))
    held = set(random.Random(f"held-out:{seed}").sample(range(len(items)), count))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def return_range(items: Sequence[EncodedDialogue]) -> tuple[float, float]:
    """The smallest and largest return any state can have (for clipping Bellman targets)."""
    low, high = 0.0, 0.0
    for item in items:
        suffix = 0.0
        for r in reversed(item.turn_rewards):
            suffix += r
            low, high = min(low, suffix), max(high, suffix)
    return low, high


# --- batching -------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Right-padded token-level tensors of a batch (shape ``[B, T]``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    next_state: torch.Tensor  # index into the same row; 0 where done (masked by ``dones``)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())

    def to(self, device: str | torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(items: Sequence[EncodedDialogue], pad_id: int) -> Batch:
    """Pad a list of dialogues into one :class:`Batch`."""
    width = max(len(item) for item in items)
    size = (len(items), width)
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    attention = torch.zeros(size, dtype=torch.long)
    actions = torch.zeros(size, dtype=torch.bool)
    rewards = torch.zeros(size)
    dones = torch.zeros(size, dtype=torch.bool)
    next_state = torch.zeros(size, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        attention[row, :n] = 1
        actions[row, :n] = torch.tensor(item.action_mask)
        rewards[row, :n] = torch.tensor(item.rewards)
        dones[row, :n] = torch.tensor(item.dones)
        next_state[row, :n] = torch.tensor(item.next_state).clamp(min=0)
    return Batch(input_ids, attention, actions, rewards, dones, next_state)


class MixingSampler:
    """Endless, seeded, length-grouped batches over imagined and real dialogues.

    Each example is drawn from the ``real`` sources with probability ``real_ratio`` (from the other
    sources otherwise; when one side is empty the other is used), then within its side in proportion to
    ``source_weights`` (default 1 per source) spread over that source's dialogues. ``max_real_weight`` caps how
    much more often a real dialogue is drawn than an imagined one: with few real dialogues the real share falls
    below ``real_ratio`` (``n_real·w / (n_real·w + n_imagined)``) instead of repeating them until memorised.
    Batches are formed from a pool of ``group_factor`` batches sorted by length, so padding stays small, and
    yielded in random order.
    """

    def __init__(
        self,
        items: Sequence[EncodedDialogue],
        *,
        batch_size: int,
        real_ratio: float = 0.3,
        source_weights: Mapping[str, float] | None = None,
        real_sources: Sequence[str] = ("real",),
        max_real_weight: float | None = None,
        group_factor: int = 8,
        seed: int = 0,
    ) -> None:
        if not items:
            raise DatasetError("cannot sample batches from an empty dataset")
        if not 0.0 <= real_ratio <= 1.0:
            raise ValueError(f"real_ratio must be within [0, 1], not {real_ratio}")
        self.items = list(items)
        self.batch_size = batch_size
        self.group_factor = group_factor
        self.random = random.Random(seed)
        weights = dict(source_weights or {})
        sides: dict[bool, tuple[list[int], list[float]]] = {True: ([], []), False: ([], [])}
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.source] = counts.get(item.source, 0) + 1
        for index, item in enumerate(self.items):
            weight = weights.get(item.source, 1.0) / counts[item.source]
            if weight > 0:
                side = sides[item.source in real_sources]
                side[0].append(index)
                side[1].append(weight)
        self._sides = sides
        has_real, has_imagined = bool(sides[True][0]), bool(sides[False][0])
        if not (has_real or has_imagined):
            raise DatasetError("every source has weight 0: nothing to sample")
        self.real_ratio = real_ratio if (has_real and has_imagined) else (1.0 if has_real else 0.0)
        if has_real and has_imagined and max_real_weight is not None:
            n_real, n_imagined = len(sides[True][0]), len(sides[False][0])
            self.real_ratio = min(self.real_ratio, n_real * max_real_weight / (n_real * max_real_weight + n_imagined))

    def draw_index(self) -> int:
        """The index of one dialogue, drawn according to the mixing ratio and source weights."""
        indices, weights = self._sides[self.random.random() < self.real_ratio]
        return self.random.choices(indices, weights)[0]

    def draw(self) -> EncodedDialogue:
        """One dialogue, drawn according to the mixing ratio and source weights."""
        return self.items[self.draw_index()]

    def probabilities(self) -> list[float]:
        """Each dialogue's probability of being drawn (the weights of its cached transitions, its loss share)."""
        probabilities = [0.0] * len(self.items)
        for is_real, (indices, weights) in self._sides.items():
            side_probability = self.real_ratio if is_real else 1.0 - self.real_ratio
            total = sum(weights) or 1.0
            for index, weight in zip(indices, weights, strict=True):
                probabilities[index] = side_probability * weight / total
        return probabilities

    def index_batches(self) -> Iterator[list[int]]:
        """Endless batches of dialogue indices, each batch of similar lengths."""
        while True:
            drawn = [self.draw_index() for _ in range(self.batch_size * self.group_factor)]
            pool = sorted(drawn, key=lambda i: len(self.items[i]))
            batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            self.random.shuffle(batches)
            yield from batches

    def __iter__(self) -> Iterator[list[EncodedDialogue]]:
        for indices in self.index_batches():
            yield [self.items[i] for i in indices]
