"""The split decoder: cached frozen lower layers + trainable upper layers equal the whole trunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learning.base_model import load_base_model
from learning.lora import attach_lora, hidden_states
from learning.split_trunk import LowerStates, UpperStack, common_prefix_length, num_layers
from learning.training.features import frozen_layers


def _check_equal(base_model: str, upper_layers: int, tmp_path: Path, **kwargs: object) -> None:
    base = load_base_model(base_model, **kwargs)  # type: ignore[arg-type]
    model = attach_lora(base.model, rank=4, alpha=8, mlp=True, upper_layers=upper_layers)
    split = frozen_layers(model)
    assert split == num_layers(model) - upper_layers
    with torch.no_grad():  # a non-zero adapter, so the upper layers really differ from the base model's
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    tokenizer = base.tokenizer
    shared = "<|im_start|>system\nYou are a travel agent.<|im_end|>\n" if base_model == "smollm2" else "system: agent "
    texts = [shared + "hello there, how are you today?", shared + "hi", shared + "what a lovely castle tour"]
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert common_prefix_length(sequences) >= 3
    cache_file = tmp_path / "lower.safetensors"
    lower = LowerStates.build(model, sequences, split=split, pad_id=tokenizer.pad_token_id, cache_file=cache_file)
    again = LowerStates.build(model, sequences[::-1], split=split, pad_id=tokenizer.pad_token_id, cache_file=cache_file)
    assert torch.equal(again.states[0], lower.states[2])  # read back from the file, in the new order
    upper = UpperStack.of(model, split)
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    with torch.no_grad():
        full = hidden_states(model, ids, mask)
        split_out = upper(lower.batch([0, 1, 2]))
    assert split_out.shape == full.shape
    assert torch.allclose(split_out[mask.bool()], full[mask.bool()], atol=1e-4)


def test_split_trunk_equals_the_whole_trunk_tiny(tmp_path: Path) -> None:
    _check_equal("tiny", 1, tmp_path)


@pytest.mark.smollm2
def test_split_trunk_equals_the_whole_trunk_smollm2(tmp_path: Path, model_cache_dir: Path) -> None:
    _check_equal("smollm2", 4, tmp_path, cache_dir=model_cache_dir)


def test_gradients_reach_the_adapter_through_the_shared_prefix() -> None:
    base = load_base_model("tiny")
    model = attach_lora(base.model, rank=4, alpha=8, upper_layers=1)
    sequences = [[5, 6, 7, 8, 9], [5, 6, 7, 10]]
    lower = LowerStates.build(model, sequences, split=frozen_layers(model), pad_id=0)
    out = UpperStack.of(model, frozen_layers(model))(lower.batch([0, 1]))
    out[:, :3].sum().backward()  # prefix positions only: their gradient comes through the shared computation
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A gets none while B is 0
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
