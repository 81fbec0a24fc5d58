"""The decoder split in two: frozen lower layers run once per dialogue, trainable upper layers every step.

LoRA adapts only the top ``upper_layers`` decoder layers (```learning.lora.attach_lora``), so the hidden
state entering them does not depend on training: :class:`LowerStates` computes it once for every dialogue
and each training step runs only the upper layers (and the output layer at action positions). With 4 of
SmolLM2's 30 layers trainable a step costs about a seventh of a full forward and backward pass, and the
same cached states give the value stage its base-trunk features (upper layers with the adapter disabled).

Every dialogue starts with the same tokens (system prompt, opening line: about half of each sequence), so
both passes compute that prefix once and let each dialogue's own tokens attend to its cached keys and values
(``DynamicCache``, repeated over the batch, gradients included). :func:`_run` mirrors the Llama-style
decoder's own forward (rotary embeddings, the library's causal mask builder, the layers, the final norm),
so ``upper(lower(x)) == trunk(x)``; a test checks it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from learning.cpus import follow_cpu_affinity
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
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Decoder ``layers`` over ``hidden`` ``[B, S, d]``, after the ``P`` positions already in ``cache`` (if any).

    ``attention_mask`` is ``[B, P + S]`` (right padding); positions continue after the cached ones.
    """
    past = cache.layers[layers[0].self_attn.layer_idx].get_seq_length() if cache is not None and layers else 0
    position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
    causal_mask = create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layers[0].self_attn.layer_idx if cache is not None and layers else None,
    )
    position_embeddings = rotary(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
    return norm(hidden) if norm is not None else hidden


def _shared_prefix_run(
    config: object,
    rotary: nn.Module,
    layers: Sequence[nn.Module],
    norm: nn.Module | None,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    suffix_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layers`` over ``[prefix; suffix_b]`` for every row ``b``, computing the shared prefix ``[P, d]`` once.

    The prefix's keys and values are cached (with their gradient) and repeated for the ``B`` suffixes
    ``[B, S, d]``; returns the prefix output ``[P, d]`` and the suffixes' ``[B, S, d]``.
    """
    if prefix.shape[0] == 0:
        return prefix, _run(config, rotary, layers, norm, suffix, suffix_mask)
    cache = DynamicCache(config=config)
    ones = torch.ones((1, prefix.shape[0]), dtype=suffix_mask.dtype, device=suffix_mask.device)
    prefix_out = _run(config, rotary, layers, norm, prefix.unsqueeze(0), ones, cache)
    cache.batch_repeat_interleave(suffix.shape[0])
    mask = torch.cat([ones.expand(suffix.shape[0], -1), suffix_mask], dim=1)
    suffix_out = _run(config, rotary, layers, norm, suffix, mask, cache)
    return prefix_out[0], suffix_out


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence shares (the system prompt and opening line), leaving each
    sequence at least one token of its own."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for sequence in sequences[1:]:
        k = 0
        while k < length and sequence[k] == first[k]:
            k += 1
        length = k
    return max(length, 0)


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

    def forward(self, lower: LowerBatch) -> torch.Tensor:
        """``[B, T, d]`` last hidden states (right-padded) of the dialogues in ``lower``."""
        if not len(self.layers):  # nothing trainable above the cache: the norm alone
            return self.norm(lower.full())
        prefix, suffix = _shared_prefix_run(
            self.config, self.rotary, self.layers, self.norm, lower.prefix, lower.suffix, lower.suffix_mask
        )
        return torch.cat([prefix.unsqueeze(0).expand(suffix.shape[0], -1, -1), suffix], dim=1)


@dataclass
class LowerBatch:
    """Lower-layer states of a batch: the shared prefix ``[P, d]`` once, the right-padded rest ``[B, S, d]``."""

    prefix: torch.Tensor
    suffix: torch.Tensor
    suffix_mask: torch.Tensor

    def full(self) -> torch.Tensor:
        """``[B, P + S, d]``: the prefix repeated in front of every row."""
        return torch.cat([self.prefix.unsqueeze(0).expand(self.suffix.shape[0], -1, -1), self.suffix], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, P + S]``: ones over the prefix, the suffix mask after it."""
        ones = torch.ones((self.suffix.shape[0], self.prefix.shape[0]), dtype=self.suffix_mask.dtype)
        return torch.cat([ones.to(self.suffix_mask.device), self.suffix_mask], dim=1)

    def to(self, device: torch.device | str) -> LowerBatch:
        """The same batch on ``device``."""
        return LowerBatch(self.prefix.to(device), self.suffix.to(device), self.suffix_mask.to(device))


def _sequence_key(sequence: Sequence[int]) -> str:
    return hashlib.sha1(torch.tensor(list(sequence), dtype=torch.int64).numpy().tobytes()).hexdigest()


class LowerStates:
    """Hidden states entering the first trainable layer, computed once per dialogue (frozen lower layers).

    Every sequence starts with the same ``prefix`` tokens (system prompt, opening line), whose states are
    computed and kept once (``prefix_states`` ``[P, d]``); ``states[i]`` holds the rest of sequence ``i``
    (``[len_i − P, d]``, float32).
    """

    def __init__(self, split: int, prefix_states: torch.Tensor, states: list[torch.Tensor]) -> None:
        self.split = split
        self.prefix_states = prefix_states
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
        """Run the lower ``split`` layers over every sequence, the shared prefix once, the rest batched by length.

        With ``cache_file`` (one file per base model and split), states of sequences seen before are read back
        and new ones are added to it, so runs on the same dialogues (BC, filtered BC, the critic) share them.
        """
        decoder = trunk(model)
        device = next(model.parameters()).device
        length = common_prefix_length(sequences)
        prefix_ids = list(sequences[0][:length])
        prefix_key = "prefix:" + _sequence_key(prefix_ids)
        keys = [f"{prefix_key}:{_sequence_key(s[length:])}" for s in sequences]
        known: dict[str, torch.Tensor] = {}
        if cache_file is not None and cache_file.is_file():
            known = load_file(str(cache_file))
        layers = decoder.layers[:split]
        cache = DynamicCache(config=decoder.config)
        embeds = decoder.embed_tokens(torch.tensor([prefix_ids], device=device))
        # the shared prefix is short: recompute it every time (its keys and values are needed for the rest anyway)
        if length == 0 or not layers:
            prefix_states = embeds[0].float()
        else:
            ones = torch.ones((1, length), dtype=torch.long, device=device)
            prefix_states = _run(decoder.config, decoder.rotary_emb, layers, None, embeds, ones, cache)[0].float()
        states: list[torch.Tensor | None] = [known[key].to(device) if key in known else None for key in keys]
        order = sorted((i for i, s in enumerate(states) if s is None), key=lambda i: len(sequences[i]))
        task_id = progress.add_task("frozen layers", total=len(order), terms="") if progress else None
        start = 0
        while start < len(order):
            follow_cpu_affinity()
            # as many sequences as fit into batch_tokens at the width of the longest (last) one
            end = start + 1
            while end < len(order) and (end - start + 1) * (len(sequences[order[end]]) - length) <= batch_tokens:
                end += 1
            chunk = order[start:end]
            width = max(len(sequences[i]) for i in chunk) - length
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                rest = list(sequences[index][length:])
                ids[row, : len(rest)] = torch.tensor(rest)
                mask[row, : len(rest)] = 1
            if layers and length:
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(len(chunk))
                full_mask = torch.cat([torch.ones((len(chunk), length), dtype=torch.long), mask], dim=1)
                hidden = _run(
                    decoder.config,
                    decoder.rotary_emb,
                    layers,
                    None,
                    decoder.embed_tokens(ids.to(device)),
                    full_mask.to(device),
                    batch_cache,
                ).float()
            elif layers:
                hidden = _run(
                    decoder.config,
                    decoder.rotary_emb,
                    layers,
                    None,
                    decoder.embed_tokens(ids.to(device)),
                    mask.to(device),
                ).float()
            else:
                hidden = decoder.embed_tokens(ids.to(device)).float()
            for row, index in enumerate(chunk):
                states[index] = hidden[row, : len(sequences[index]) - length].clone()
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
        return cls(split, prefix_states, [s for s in states if s is not None])

    def batch(self, indices: Sequence[int]) -> LowerBatch:
        """The shared prefix and the right-padded rest of dialogues ``indices``."""
        chosen = [self.states[i] for i in indices]
        width = max(len(s) for s in chosen)
        suffix = chosen[0].new_zeros((len(chosen), width, chosen[0].shape[-1]))
        mask = torch.zeros((len(chosen), width), dtype=torch.long, device=suffix.device)
        for row, state in enumerate(chosen):
            suffix[row, : len(state)] = state
            mask[row, : len(state)] = 1
        return LowerBatch(self.prefix_states, suffix, mask)

    def nbytes(self) -> int:
        """Memory the cached states take."""
        return sum(s.numel() * s.element_size() for s in [self.prefix_states, *self.states])
