"""Dataset building: chat-template encoding, action masks, rewards, transitions, truncation, mixing, bad data."""

from __future__ import annotations

from collections import Counter

import pytest

from imagine.task import load_task
from learning.base_model import tiny_tokenizer
from learning.dataset import (
    DatasetError,
    EncodingConfig,
    MixingSampler,
    collate,
    encode_dialogue,
    encode_records,
    return_range,
)
from learning.interface import Message
from storage import DialogueRecord, TurnRecord

TASK = load_task("travel")
TOKENIZER = tiny_tokenizer()


def dialogue() -> list[Message]:
    return [
        Message("agent", TASK.opening_line),
        Message("user", "a beach trip"),
        Message("agent", "what budget"),
        Message("user", "cheap"),
        Message("agent", "try the beach"),
        Message("user", "great thanks"),
    ]


def record(reward: float | None, source: str = "imagined", agent_text: str = "try the beach") -> DialogueRecord:
    turns = (
        TurnRecord("agent", TASK.opening_line),
        TurnRecord("user", "hello"),
        TurnRecord("agent", agent_text),
        TurnRecord("user", "okay"),
    )
    return DialogueRecord(id=None, source=source, task="travel", turns=turns, reward=reward)


def test_only_agent_reply_tokens_are_actions_and_they_decode_to_the_replies() -> None:
    item = encode_dialogue(TOKENIZER, TASK.system_prompt, dialogue(), reward=1.0)
    action_text = TOKENIZER.decode([t for t, a in zip(item.input_ids, item.action_mask, strict=True) if a])
    # the opening line (sent by the bot itself) and every user/system token are context, not actions
    assert action_text == "what budget<|im_end|>try the beach<|im_end|>"
    for start, end in zip(item.turn_state, item.turn_end, strict=True):
        assert TOKENIZER.decode(item.input_ids[start - 4 : start + 1]).endswith("assistant\n")
        assert item.input_ids[end] == TOKENIZER.convert_tokens_to_ids("<|im_end|>")


def test_terminal_reward_sits_on_the_last_agent_token_and_transitions_skip_user_turns() -> None:
    item = encode_dialogue(TOKENIZER, TASK.system_prompt, dialogue(), reward=1.0)
    first_end, last_end = item.turn_end
    assert item.rewards[last_end] == 1.0 and sum(item.rewards) == 1.0
    assert item.dones[last_end] and sum(item.dones) == 1
    # after the first reply, s′ is the state right before the next agent turn (the user's reply is observation)
    assert item.next_state[first_end] == item.turn_state[1]
    assert item.next_state[first_end - 1] == first_end - 1
    assert item.turn_rewards == [0.0, 1.0] and item.turn_dones == [False, True]


def test_per_turn_thumbs_rewards_land_on_their_turn() -> None:
    item = encode_dialogue(TOKENIZER, TASK.system_prompt, dialogue(), reward=0.0, turn_rewards={2: -0.25})
    assert item.rewards[item.turn_end[0]] == -0.25
    assert item.turn_rewards == [-0.25, 0.0]
    assert return_range([item]) == (-0.25, 0.0)


def test_truncation_drops_whole_turns_from_the_start_and_keeps_the_system_prompt() -> None:
    full = encode_dialogue(TOKENIZER, TASK.system_prompt, dialogue(), reward=1.0)
    short = encode_dialogue(
        TOKENIZER, TASK.system_prompt, dialogue(), reward=1.0, config=EncodingConfig(max_length=len(full) - 5)
    )
    assert short.truncated_turns >= 1
    text = TOKENIZER.decode(short.input_ids)
    assert text.startswith("<|im_start|>system\n" + TASK.system_prompt[:20])
    assert TASK.opening_line not in text and "try the beach" in text
    assert "<|im_start|>user\n" in text[len("<|im_start|>system") :]  # no half turns: every turn has its header
    with pytest.raises(DatasetError, match="does not fit"):
        encode_dialogue(TOKENIZER, TASK.system_prompt, dialogue(), reward=1.0, config=EncodingConfig(max_length=40))


def test_bad_data_gives_clear_errors() -> None:
    with pytest.raises(DatasetError, match="empty"):
        encode_records([], TOKENIZER, TASK)
    with pytest.raises(DatasetError, match="has a reward"):
        encode_records([record(None), record(None)], TOKENIZER, TASK)
    with pytest.raises(DatasetError, match="no usable dialogue"):
        encode_records([record(1.0)], TOKENIZER, TASK, config=EncodingConfig(max_length=30))
    _, summary = encode_records([record(1.0), record(None), record(0.0)], TOKENIZER, TASK)
    assert summary.dialogues == 2 and summary.dropped == {"no reward": 1} and summary.success_rate == 0.5
    kept, _ = encode_records([record(1.0), record(0.0)], TOKENIZER, TASK, min_reward=1.0)
    assert [k.reward for k in kept] == [1.0]


def test_collate_pads_and_masks() -> None:
    a = encode_dialogue(TOKENIZER, TASK.system_prompt, dialogue(), reward=1.0)
    b = encode_dialogue(TOKENIZER, TASK.system_prompt, dialogue()[:3], reward=0.0)
    batch = collate([a, b], pad_id=TOKENIZER.pad_token_id)
    assert batch.input_ids.shape == (2, len(a))
    assert batch.num_tokens == len(a) + len(b)
    assert not batch.action_mask[1, len(b) :].any()
    assert batch.action_mask.sum() == a.num_actions + b.num_actions


def test_mixing_sampler_follows_ratio_and_source_weights() -> None:
    items, _ = encode_records(
        [record(1.0, "imagined")] * 30 + [record(0.0, "real", "try the city")] * 10, TOKENIZER, TASK
    )
    sampler = MixingSampler(items, batch_size=10, real_ratio=0.3, seed=1)
    counts = Counter(sampler.draw().source for _ in range(4000))
    assert 0.26 < counts["real"] / 4000 < 0.34
    batches = iter(sampler)
    batch = next(batches)
    assert len(batch) == 10
    # weight 0 removes a source; with one side empty the other is used whatever the ratio
    only_imagined = MixingSampler(items, batch_size=4, real_ratio=0.9, source_weights={"real": 0.0})
    assert {only_imagined.draw().source for _ in range(200)} == {"imagined"}
    with pytest.raises(DatasetError):
        MixingSampler([], batch_size=2)


def test_a_few_real_dialogues_are_not_repeated_beyond_the_cap() -> None:
    items, _ = encode_records(
        [record(1.0, "imagined")] * 60 + [record(0.0, "real", "try the city")] * 2, TOKENIZER, TASK
    )
    capped = MixingSampler(items, batch_size=8, real_ratio=0.3, max_real_weight=4.0, seed=2)
    assert capped.real_ratio == pytest.approx(8 / 68)  # 2 real × 4 vs 60 imagined, not 30 %
    real = sum(p for p, item in zip(capped.probabilities(), items, strict=True) if item.source == "real")
    assert real == pytest.approx(8 / 68)
    counts = Counter(capped.draw().source for _ in range(4000))
    assert 0.09 < counts["real"] / 4000 < 0.15
    # with enough real dialogues the ratio holds
    plenty, _ = encode_records([record(1.0, "imagined")] * 30 + [record(0.0, "real")] * 10, TOKENIZER, TASK)
    assert MixingSampler(plenty, batch_size=8, real_ratio=0.3, max_real_weight=4.0).real_ratio == 0.3
