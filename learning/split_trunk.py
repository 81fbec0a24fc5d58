"""The decoder split in two: frozen lower layers run once per dialogue, trainable upper layers every step.

LoRA adapts only the top ``upper_layers`` decoder layers (```learning.lora.attach_lora``), so the hidden
state entering them does not depend on training: :class:`LowerStates` computes it once for every dialogue
and each training step runs only the upper layers (and the output layer at action positions). With 4 of
SmolLM2's 30 layers trainable a step costs about a seventh of a full forward and backward pass, and the
same cached states give the value stage its base-trunk features (upper layers with the adapter disabled).

:func:`run_layers` mirrors the Llama-style decoder's own forward (rotary embeddings, the library's causal
mask builder, the decoder layers, the final norm), so ``upper(lower(x)) == trunk(x)``; a test checks it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.masking_utils import create_causal_mask

from learning.lora import trunk


def num_layers(model: nn.Module) -> int:
    """How many decoder layers the model has."""
    return len(trunk(model).layers)


def _run(
    config: object,
    rotary: nn.Module,
    layers: Sequence[nn.Module],
    norm: nn.Module | None,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    causal_mask = create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    position_embeddings = rotary(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(
            hidden, attention_mask=causal_mask, position_embeddings=position_embeddings, position_ids=position_ids
        )
    return norm(hidden) if norm is not None else hidden


def lower_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: int) -> torch.Tensor:
    """The hidden state entering layer ``split`` (embeddings, then layers ``0..split-1``), right-padded input."""
    decoder = trunk(model)
    embeds = decoder.embed_tokens(input_ids)
    return _run(decoder.config, decoder.rotary_emb, decoder.layers[:split], None, embeds, attention_mask)


class UpperStack(nn.Module):
    """Decoder layers ``split..N-1`` and the final norm: the cached lower state in, the last hidden state out.

    :meth:`of` shares the model's own (LoRA-adapted) modules, so training it trains the policy's adapter;
    :meth:`copy` makes an independent copy (the critic's trunk).
    """

    def __init__(self, config: object, rotary: nn.Module, layers: nn.ModuleList, norm: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.rotary = rotary
        self.layers = layers
        self.norm = norm

    @classmethod
    def of(cls, model: nn.Module, split: int) -> UpperStack:
        """The upper part of ``model``'s decoder (the same modules, not a copy)."""
        decoder = trunk(model)
        return cls(decoder.config, decoder.rotary_emb, nn.ModuleList(decoder.layers[split:]), decoder.norm)

    def copy(self) -> UpperStack:
        """An independent deep copy of the layers and norm (the rotary embedding has no weights to train)."""
        return UpperStack(self.config, self.rotary, copy.deepcopy(self.layers), copy.deepcopy(self.norm))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` last hidden states from ``[B, T, d]`` lower states (right-padded)."""
        return _run(self.config, self.rotary, self.layers, self.norm, hidden, attention_mask)


def _sequence_key(sequence: Sequence[int]) -> str:
    return hashlib.sha1(torch.tensor(list(sequence), dtype=torch.int64).numpy().tobytes()).hexdigest()


class LowerStates:
    """Per-dialogue hidden states entering the first trainable layer, computed once (frozen lower layers).

    ``states[i]`` is ``[len_i, d]`` (float32, unpadded) for the ``i``-th token sequence given to :meth:`build`.
    """

    def __init__(self, split: int, states: list[torch.Tensor]) -> None:
        self.split = split
        self.states = states

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        sequences: Sequence[Sequence[int]],
        *,
        split: int,
        pad_id: int,
        batch_tokens: int = 4096,
        cache_file: Path | None = None,
        progress: Progress | None = None,
    ) -> LowerStates:
        """Run the lower ``split`` layers over every sequence, batched by length to waste little padding.

        With ``cache_file`` (one file per base model and split), states of sequences seen before are read back
        and new ones are added to it, so runs on the same dialogues (BC, filtered BC, the critic) share them.
        """
        device = next(model.parameters()).device
        keys = [_sequence_key(sequence) for sequence in sequences]
        known: dict[str, torch.Tensor] = {}
        if cache_file is not None and cache_file.is_file():
            known = load_file(str(cache_file))
        states: list[torch.Tensor | None] = [known[key].to(device) if key in known else None for key in keys]
        missing = [i for i, state in enumerate(states) if state is None]
        order = sorted(missing, key=lambda i: len(sequences[i]))
        task_id = progress.add_task("frozen layers", total=len(order), terms="") if progress else None
        start = 0
        while start < len(order):
            # as many sequences as fit into batch_tokens at the width of the longest (last) one
            end = start + 1
            while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= batch_tokens:
                end += 1
            chunk = order[start:end]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids[row, : len(sequences[index])] = torch.tensor(list(sequences[index]))
                mask[row, : len(sequences[index])] = 1
            hidden = lower_forward(model, ids.to(device), mask.to(device), split).float()
            for row, index in enumerate(chunk):
                states[index] = hidden[row, : len(sequences[index])].clone()
            if progress is not None and task_id is not None:
                progress.advance(task_id, len(chunk))
            start = end
        if progress is not None and task_id is not None:
            progress.remove_task(task_id)
        if cache_file is not None and order:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            known.update({keys[i]: states[i].cpu() for i in order if states[i] is not None})
            staging = cache_file.with_suffix(".tmp")
            save_file(known, str(staging))
            staging.replace(cache_file)  # readers never see a half-written file
        return cls(split, [s for s in states if s is not None])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``[B, T, d]`` states and their ``[B, T]`` attention mask for dialogues ``indices``."""
        chosen = [self.states[i] for i in indices]
        width = max(len(s) for s in chosen)
        hidden = chosen[0].new_zeros((len(chosen), width, chosen[0].shape[-1]))
        mask = torch.zeros((len(chosen), width), dtype=torch.long, device=hidden.device)
        for row, state in enumerate(chosen):
            hidden[row, : len(state)] = state
            mask[row, : len(state)] = 1
        return hidden, mask

    def nbytes(self) -> int:
        """Memory the cached states take."""
        return sum(s.numel() * s.element_size() for s in self.states)
