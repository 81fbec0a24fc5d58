"""The LoRA-adapted base model: attaching, saving and loading the adapter, and reaching its parts.

Training and inference read the trunk's last hidden state and apply the output layer only where needed
(action positions, the last position while decoding), which is cheaper than full-sequence logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The underlying ``*ForCausalLM`` of a (possibly peft-wrapped) model."""
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model  # type: ignore[return-value]


def trunk(model: nn.Module) -> nn.Module:
    """The decoder stack that yields last hidden states (LoRA layers are injected into it in place)."""
    return causal_lm(model).get_decoder()


def output_embedding(model: nn.Module) -> torch.Tensor:
    """The output layer's weight ``[|V|, d]`` (tied to the input embedding on SmolLM2)."""
    return causal_lm(model).get_output_embeddings().weight


def lora_config(
    *, rank: int = 8, alpha: int = 16, mlp: bool = False, layers: list[int] | None = None, dropout: float = 0.0
) -> LoraConfig:
    """LoRA on the attention projections (and the MLP's with ``mlp``), in ``layers`` only (``None``: all)."""
    targets = list(ATTENTION_TARGETS + (MLP_TARGETS if mlp else ()))
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
    )


def attach_lora(
    model: PreTrainedModel,
    *,
    rank: int = 8,
    alpha: int = 16,
    mlp: bool = False,
    upper_layers: int | None = None,
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only the adapter trains.

    ``upper_layers`` limits the adapter to the top that many decoder layers, so the lower layers stay the base
    model's and their output can be computed once (``learning.split_trunk``); ``None`` adapts every layer.
    """
    total = len(causal_lm(model).get_decoder().layers)
    layers = None if upper_layers is None or upper_layers >= total else list(range(total - upper_layers, total))
    return get_peft_model(model, lora_config(rank=rank, alpha=alpha, mlp=mlp, layers=layers, dropout=dropout))


def load_lora(model: PreTrainedModel, directory: Path, *, trainable: bool) -> PeftModel:
    """Load a saved adapter onto ``model`` (trainable to continue training from a checkpoint)."""
    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


def save_lora(model: PeftModel, directory: Path) -> None:
    """Write only the adapter files (peft's README is left out of checkpoints)."""
    model.save_pretrained(str(directory))
    readme = directory / "README.md"
    if readme.exists():
        readme.unlink()


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, d]`` of right- or left-padded sequences."""
    return trunk(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
