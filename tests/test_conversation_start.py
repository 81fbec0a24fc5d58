"""One conversation start everywhere, and an imitation loss that weighs every action token the same.

The task's opening line is the agent's first turn in the imagined data (training context, not an action), in
serving (the bot sends it) and in evaluation; the prompt the policy gets at its first action must be, token for
token, the prefix the trainer learned that action from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from imagine.simulated import BehaviourPolicy, generate_scripted_dialogues
from imagine.task import load_task
from learning.dataset import collate, encode_dialogue, encode_records
from learning.evaluation import evaluate
from learning.interface import Message
from learning.lora import attach_lora, output_embedding
from learning.notes import with_notes
from learning.policy import LearnedPolicy, load_policy
from learning.split_trunk import LowerStates, UpperStack
from learning.training import TrainConfig
from learning.training.imitation import ImitationObjective, policy_loss
from storage import DialogueRecord, TurnRecord

TRAVEL = load_task("travel")


class FirstPrompts:
    """Delegates to a real policy and keeps the token prompt it built for each history of its first call."""

    version_id: int | None = None

    def __init__(self, policy: LearnedPolicy) -> None:
        self.policy = policy
        self.name = policy.name
        self.histories: list[list[Message]] = []
        self.prompts: list[list[int]] = []

    def respond_batch(self, histories: Sequence[Sequence[Message]], *, seed: int | None = None) -> list[str]:
        if not self.prompts:
            self.histories = [list(h) for h in histories]
            self.prompts = [self.policy.prompt_ids(h) for h in histories]
        return self.policy.respond_batch(histories, seed=seed)

    async def respond(self, history: Sequence[Message]) -> str:
        return self.respond_batch([history])[0]

    def close(self) -> None:
        self.policy.close()


def _first_prompts_equal_training_prefixes(policy: LearnedPolicy) -> None:
    recorder = FirstPrompts(policy)
    evaluate([recorder], TRAVEL, users="scripted", episodes=3, seed=5, progress=False)
    assert len(recorder.prompts) == 3
    for history, prompt in zip(recorder.histories, recorder.prompts, strict=True):
        assert [m.role for m in history] == ["agent", "user"]
        assert history[0].text == TRAVEL.opening_line
        # the same history as a training dialogue (user turns with their notes, as encode_records writes them),
        # followed by the agent's first action
        item = encode_dialogue(
            policy.tokenizer,
            TRAVEL.system_prompt,
            with_notes(TRAVEL, [*history, Message("agent", "What is your budget?")]),
            reward=1.0,
        )
        assert len(item.turn_state) == 1  # the opening line is context, not an action
        assert prompt == item.input_ids[: item.turn_state[0] + 1]


def test_evaluation_starts_like_training_and_serving_tiny() -> None:
    _first_prompts_equal_training_prefixes(load_policy("base", task=TRAVEL, base_model="tiny", max_new_tokens=4))


@pytest.mark.smollm2
def test_evaluation_starts_like_training_and_serving_smollm2(model_cache_dir: Path) -> None:
    policy = load_policy("base", task=TRAVEL, base_model="smollm2", cache_dir=model_cache_dir, max_new_tokens=4)
    _first_prompts_equal_training_prefixes(policy)


def test_scripted_agents_score_as_their_behaviour_from_the_opening_line() -> None:
    careful, eager = BehaviourPolicy("travel", "careful"), BehaviourPolicy("travel", "eager")
    report = evaluate([careful, eager], TRAVEL, users="scripted", episodes=60, seed=3, progress=False)
    assert report.result("scripted:careful").success_rate == 1.0
    assert report.result("scripted:eager").success_rate < 0.5
    for episode in report.result("scripted:careful").episodes:
        assert episode.turns[0] == ("agent", TRAVEL.opening_line)
        assert sum(role == "agent" for role, _ in episode.turns) <= TRAVEL.max_turns


def test_imitation_loss_weighs_each_action_token_the_same_in_any_batch() -> None:
    """loss([a]) + loss([b]) == loss([a, b]): a per-batch mean over tokens would give a's tokens more weight
    when a is alone in a batch (or with other short dialogues, as length-grouped batches put it)."""
    from learning.base_model import load_base_model

    base = load_base_model("tiny")
    model = attach_lora(base.model, rank=4, alpha=8, upper_layers=1)
    records = generate_scripted_dialogues("travel", 40, seed=1)
    items, _ = encode_records(records, base.tokenizer, TRAVEL)
    short = min(range(len(items)), key=lambda i: items[i].num_actions)
    long = max(range(len(items)), key=lambda i: items[i].num_actions)
    assert items[long].num_actions > 2 * items[short].num_actions
    split = len(model.base_model.model.model.layers) - 1
    lower = LowerStates.build(model, [i.input_ids for i in items], split=split, pad_id=base.tokenizer.pad_token_id)
    upper = UpperStack.of(model, split)
    objective = ImitationObjective(items, None, [1 / len(items)] * len(items), batch_size=2)
    embedding = output_embedding(model).detach()
    config = TrainConfig(base_model="tiny")

    def loss(indices: list[int]) -> float:
        batch = collate([items[i] for i in indices], base.tokenizer.pad_token_id)
        hidden = upper(lower.batch(indices))
        weights = objective.token_weights(indices, batch)
        value, _ = policy_loss(model, hidden, batch, weights, objective.normalizer, embedding, None, config, (0, 1))
        return value.item()

    with torch.no_grad():
        together = loss([short, long])
        apart = loss([short]) + loss([long])
    assert together == pytest.approx(apart, rel=1e-4)


def test_a_rating_of_three_or_more_counts_as_success_in_training_statistics() -> None:
    from learning.base_model import load_base_model

    tokenizer = load_base_model("tiny").tokenizer
    turns = (TurnRecord("agent", TRAVEL.opening_line), TurnRecord("user", "hi"), TurnRecord("agent", "Budget?"))
    records = [
        DialogueRecord(id=None, source="real", task="travel", turns=turns, reward=reward) for reward in (0.75, 0.25)
    ]
    _, summary = encode_records(records, tokenizer, TRAVEL)
    assert summary.success_rate == 0.5
