"""Batched decoding with the KV cache: plain sampling, ILQL-guided token scores, utterance reranking.

Token level (Snell et al.): among the top-k tokens of π, sample from ``softmax((log π(a|s) + β·(Q̄(s,a) −
V(s))) / temperature)``. With factorized Q heads, ``Q̄`` for the k candidates is k dot products with their
embedding rows, so ILQL costs almost nothing over plain sampling.

Utterance level: sample K replies per history from π, read ``Q̄(s, u) − V(s)`` from the hidden state at the
prompt's end and the mean hidden state over each reply's tokens (both fall out of decoding for free), keep the best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from learning.devices import native_bf16
from learning.ilql import ValueHeads, token_advantages, utterance_scores
from learning.interface import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from learning.lora import causal_lm, trunk


@dataclass(frozen=True)
class DecodeConfig:
    """Sampling settings; ``temperature = 0`` is greedy, ``beta = 0`` ignores the value heads."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    beta: float = 0.0
    candidates: int = 1  # K replies per history for utterance-level reranking
    #: bf16 where this device computes it natively (None: ``learning.devices.native_bf16``; on a CPU with AVX2
    #: only, bf16 products are emulated and 4-8× slower than fp32 from 16 rows on)
    bf16: bool | None = None

    def bf16_on(self, device: torch.device) -> bool:
        """Whether to decode in bf16 on ``device``."""
        return self.bf16 if self.bf16 is not None else native_bf16(device)


@dataclass
class Decoded:
    """Generated token ids per row and, when asked, ``state_hidden`` (the hidden state at the prompt's end) and
    ``end_hidden`` (the *sum* of the hidden states over the reply's tokens; divided by the reply's length it is
    the mean ``Q(s, u)`` reads)."""

    tokens: list[list[int]]
    state_hidden: torch.Tensor | None = None
    end_hidden: torch.Tensor | None = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every row's next token goes at the same position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    end_id: int,
    pad_id: int,
    config: DecodeConfig,
    heads: ValueHeads | None = None,
    generator: torch.Generator | None = None,
    collect_hidden: bool = False,
    value_model: torch.nn.Module | None = None,
    should_stop: Callable[[], bool] | None = None,
    repeats: int = 1,
) -> Decoded:
    """Generate one reply per prompt with the KV cache; ILQL-guided when ``heads`` and ``config.beta`` are set.

    ``value_model`` (the base model without the adapter) runs in lockstep with its own KV cache when the value
    heads read its hidden states rather than the policy's; collected hidden states then come from it too.
    ``repeats`` samples that many replies per prompt (rows ``i·repeats … i·repeats + repeats − 1``): each
    prompt is encoded once and its KV cache copied, rather than encoding the same prompt ``repeats`` times.
    """
    decoder = trunk(model)
    value_decoder = trunk(value_model) if value_model is not None else None
    value_cache = DynamicCache()
    lm = causal_lm(model)
    embedding = lm.get_output_embeddings().weight
    head_bias = getattr(lm.get_output_embeddings(), "bias", None)
    device = embedding.device
    bf16 = config.bf16_on(device)
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    batch = ids.shape[0] * repeats
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    captured = torch.zeros(batch, dtype=torch.bool, device=device)
    state_hidden = end_hidden = None
    use_values = heads is not None and config.beta != 0.0
    step_input, step_positions = ids, positions
    for step in range(config.max_new_tokens + 1):
        if should_stop is not None and should_stop():  # the policy is closing: give back what there is
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = decoder(
                input_ids=step_input,
                attention_mask=mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
            )
        hidden = out.last_hidden_state[:, -1].float()
        cache = out.past_key_values
        value_hidden = hidden
        if value_decoder is not None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                value_out = value_decoder(
                    input_ids=step_input,
                    attention_mask=mask,
                    position_ids=step_positions,
                    past_key_values=value_cache,
                    use_cache=True,
                )
            value_hidden = value_out.last_hidden_state[:, -1].float()
            value_cache = value_out.past_key_values
        if step == 0 and repeats > 1:  # the prompts are encoded once: from here on, `repeats` rows per prompt
            hidden = hidden.repeat_interleave(repeats, dim=0)
            cache.batch_repeat_interleave(repeats)
            if value_decoder is None:
                value_hidden = hidden  # the policy's own states: nothing more to copy
            else:
                value_hidden = value_hidden.repeat_interleave(repeats, dim=0)
                value_cache.batch_repeat_interleave(repeats)
            mask = mask.repeat_interleave(repeats, dim=0)
            step_positions = step_positions.repeat_interleave(repeats, dim=0)
        if collect_hidden:
            if state_hidden is None:
                state_hidden, end_hidden = value_hidden.clone(), torch.zeros_like(value_hidden)
            else:
                # Q(s, u) reads the mean hidden state over the reply's tokens, as in training
                end_hidden[~captured] += value_hidden[~captured]
                just_done = (finished | (step == config.max_new_tokens)) & ~captured
                captured |= just_done
        if bool(finished.all()) or step == config.max_new_tokens:
            break
        logits = hidden @ embedding.float().t()
        if head_bias is not None:
            logits = logits + head_bias.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        k = min(config.top_k, log_probs.shape[-1]) if config.top_k > 0 else log_probs.shape[-1]
        scores, candidates = log_probs.topk(k, dim=-1)
        if use_values:
            assert heads is not None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                advantage = token_advantages(heads, embedding, value_hidden, candidates)
            scores = scores + config.beta * advantage.float()
        if config.temperature <= 0:
            choice = scores.argmax(-1)
        else:
            choice = torch.multinomial(torch.softmax(scores / config.temperature, -1), 1, generator=generator).squeeze(
                -1
            )
        next_tokens = candidates.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        chosen_ids = next_tokens.tolist()  # one device→host copy per step, not one per row
        for row in (~finished).nonzero().flatten().tolist():
            tokens[row].append(chosen_ids[row])
        finished = finished | (next_tokens == end_id)
        step_input = next_tokens.unsqueeze(-1)
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=-1)
    return Decoded(tokens=tokens, state_hidden=state_hidden, end_hidden=end_hidden)


@torch.inference_mode()
def rerank_utterances(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    end_id: int,
    pad_id: int,
    config: DecodeConfig,
    heads: ValueHeads,
    generator: torch.Generator | None = None,
    value_model: torch.nn.Module | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[list[int]], list[float]]:
    """Sample ``config.candidates`` replies per prompt and keep the one with the highest ``Q̄(s, u) − V(s)``."""
    k = max(config.candidates, 1)
    sampling = DecodeConfig(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k, bf16=config.bf16
    )
    decoded = decode(
        model,
        prompts,
        end_id=end_id,
        pad_id=pad_id,
        config=sampling,
        generator=generator,
        collect_hidden=True,
        value_model=value_model,
        should_stop=should_stop,
        repeats=k,
    )
    assert decoded.state_hidden is not None and decoded.end_hidden is not None
    lengths = torch.tensor([max(len(t), 1) for t in decoded.tokens], device=decoded.end_hidden.device)
    reply_mean = decoded.end_hidden / lengths.unsqueeze(-1)
    end_device = decoded.end_hidden.device
    with torch.autocast(end_device.type, dtype=torch.bfloat16, enabled=config.bf16_on(end_device)):
        scores = utterance_scores(heads, decoded.state_hidden, reply_mean).float()
    empty = torch.tensor([not [t for t in toks if t != end_id] for toks in decoded.tokens], device=scores.device)
    scores = scores.masked_fill(empty, float("-inf")).view(len(prompts), k)
    best = scores.argmax(-1).tolist()
    chosen = [decoded.tokens[row * k + best[row]] for row in range(len(prompts))]
    return chosen, scores.max(-1).values.tolist()
