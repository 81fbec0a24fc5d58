"""A continuous-batching decode engine for Llama-architecture models (SmolLM2 and the tiny test model).

Why not ``model.generate`` or :func:`learning.decoding.decode`: a decode step of a 135M model on a small CPU
streams every weight from memory for a handful of rows, so it is bound by memory bandwidth and by per-call
overhead, and the layout of each product decides how close it gets. Measured (weights streamed cold, 30 layers
+ the output layer per step):

* fp32, every CPU: weights kept transposed for ``torch.mm`` (2-2.5× faster than ``F.linear`` for 4-32 rows on
  a 2-core AVX-512 Xeon), and the wide ones (gate/up, the output layer) also pre-packed for oneDNN, which takes
  2-512 rows at 0.70-0.89× the time of ``torch.mm`` (:class:`Projection`);
* with AVX512-BF16 (no AMX), up to 16 rows: oneDNN-packed bf16 weights read half the bytes: 0.6-0.75× the
  time of ``F.linear`` in fp32; without bf16 instructions bf16 is emulated and no faster than transposed fp32;
* with AMX tiles (``amx_bf16``, Sapphire Rapids and later) bf16 products run ~5× the fp32 rate from 32 rows
  on (one core, 576 × 3072: 627 vs 122 GFLOP/s at 872 rows, 204 vs 54 at 16), so every row count uses bf16;
* autocast, which ``decode`` and ``generate`` used, re-casts every weight on every step: slower than either.

q/k/v and gate/up are fused into one product each, rotary embedding turns queries and keys in one pass, the
residual additions happen inside the products, and the attention mask is built once per step.

The KV cache is per row (slot), not left-padded: every row has its own length, so a chat joins a running batch
by prefilling only its own prompt, and a finished row leaves at once (the last row moves into its slot). Each
row's keys and values are at absolute positions from 0, which is what lets a conversation's next turn reuse the
previous turn's cache (:class:`PrefixCache`): the new prompt shares its first tokens with what was decoded, so
only the new messages are encoded; the start every conversation shares (system prompt, opening line) is encoded
once and pinned (:meth:`DecodeEngine.pin`), so a new chat encodes only its own messages too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from learning.decoding import DecodeConfig
from learning.devices import amx_available, bf16_instructions
from learning.ilql import ValueHeads, token_advantages, utterance_scores
from learning.lora import causal_lm

logger = logging.getLogger(__name__)

#: ``model_type`` values whose decoder layers this engine computes (other models use ``learning.decoding``).
SUPPORTED_MODEL_TYPES = frozenset({"llama"})
#: Rotary variants whose table does not depend on the sequence length (so it can be computed once).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})
#: Layer projections: up to this many rows use packed bf16 (memory-bound), more use fp32 (compute-bound).
LAYER_BF16_ROWS = 16
#: The output layer reads 49k × d weights for only a few rows: packed bf16 wins up to here.
HEAD_BF16_ROWS = 32
#: With AMX tiles bf16 wins at every row count (see the module docstring): no limit.
AMX_BF16_ROWS = 1 << 30
#: Wide fp32 projections (out ≥ ``WIDE_PROJECTION`` × in: the MLP's gate/up, the output layer) take oneDNN's
#: pre-packed layout for these row counts: 0.70-0.89× the time of ``torch.mm`` from 2 to 512 rows on a 2-core
#: AVX-512 Xeon (1 and 2 threads), 1.2× at one row and 1.1-1.3× at 1024, where ``torch.mm`` keeps them.
PACKED_FP32_ROWS = range(2, 513)
WIDE_PROJECTION = 4


def engine_supports(model: torch.nn.Module) -> bool:
    """Whether :class:`Tower` can compute ``model``: a Llama-architecture causal LM on the CPU, static rotary table."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    if next(lm.parameters()).device.type != "cpu":  # GPUs decode well through transformers already
        return False
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    rotary = getattr(lm.get_decoder(), "rotary_emb", None)
    return rotary is not None and getattr(rotary, "rope_type", "default") in STATIC_ROPE_TYPES


def _packed_bf16_available(device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Projection:
    """``x·Wᵀ + b`` in the layout that is fastest for the number of rows (see the module docstring).

    ``bf16_rows`` is the most rows that use the bf16 weight (0: always fp32, which is what tests compare with
    plain decoding). The fp32 weight is kept transposed, ``[in, out]`` contiguous, for ``torch.mm``: measured on
    a 2-core AVX-512 Xeon (MKL, 2 threads), ``F.linear`` over the ``[out, in]`` layout took 2-2.5× as long for
    4-32 rows (576 → 3072: 16 rows 1.38 vs 0.58 ms; the 49k output layer: 25.0 vs 10.6 ms) and the same from 64
    rows on. Only the layouts a projection can use are kept in memory.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, bf16_rows: int) -> None:
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.bf16_rows = bf16_rows
        self.bias = bias.detach().float() if bias is not None else None
        fp32_used = bf16_rows < AMX_BF16_ROWS  # with AMX every call is bf16
        self.weight_t = weight.float().t().contiguous() if fp32_used else None  # [in, out]
        self.packed_fp32: torch.Tensor | None = None
        if fp32_used and self.out_features >= WIDE_PROJECTION * self.in_features:
            self.packed_fp32 = _packed_fp32(weight.float().contiguous())
        self.packed: torch.Tensor | None = None
        self.weight_bf16: torch.Tensor | None = None
        if bf16_rows > 0:
            if _packed_bf16_available(weight.device):
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), None)
                self.bias_bf16 = self.bias.to(torch.bfloat16) if self.bias is not None else None
            else:
                self.weight_bf16 = weight.to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x·Wᵀ + b``, plus ``residual`` where given (inside the product on the ``torch.mm`` path: one op fewer)."""
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        shape = (*x.shape[:-1], self.out_features)
        if rows <= self.bf16_rows:
            flat = flat.to(torch.bfloat16)
            if self.packed is not None:
                out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias_bf16, "none", [], "")
            else:
                assert self.weight_bf16 is not None
                bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
                out = F.linear(flat, self.weight_bf16, bias)
            out = out.float()
        elif self.packed_fp32 is not None and rows in PACKED_FP32_ROWS:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_fp32, self.bias, "none", [], "")
        else:
            assert self.weight_t is not None
            base = self.bias if residual is None else residual.reshape(rows, self.out_features)
            if residual is not None and self.bias is not None:
                base = base + self.bias
            out = torch.mm(flat, self.weight_t) if base is None else torch.addmm(base, flat, self.weight_t)
            return out.reshape(shape)
        out = out.reshape(shape)
        return out if residual is None else residual + out


def _packed_fp32(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in oneDNN's pre-packed fp32 layout, or ``None`` where this torch has no oneDNN for it."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _cat_bias(*modules: torch.nn.Module) -> torch.Tensor | None:
    biases = [getattr(m, "bias", None) for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [b if b is not None else torch.zeros(m.weight.shape[0]) for b, m in zip(biases, modules, strict=True)]
    )


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection


class Tower:
    """One model's weights laid out for decoding, and its forward pass over a slot KV cache.

    The cache of a batch is one tensor ``[layers, 2, slots, kv_heads, capacity, head_dim]``; a forward call
    covers the contiguous slots ``first … first + B − 1``, each row with its own start position.
    """

    def __init__(self, model: torch.nn.Module, *, bf16: bool, need_logits: bool = True) -> None:
        lm = causal_lm(model)
        config = lm.config
        decoder = lm.get_decoder()
        self.device = decoder.embed_tokens.weight.device
        self.hidden_size = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.max_positions = config.max_position_embeddings
        self.eps = config.rms_norm_eps
        self.act = decoder.layers[0].mlp.act_fn
        self.embedding = decoder.embed_tokens.weight.detach()
        amx = amx_available(self.device)
        # without bf16 instructions (AMX tiles or AVX512-BF16) bf16 products are emulated: 4-8× slower than fp32
        # from 16 rows on with AVX2 (AMD EPYC, 576 × 1536), and on an AVX-512 Xeon without them no faster than
        # the transposed fp32 product even at 1 row (the output layer: 3.69 vs 3.58 ms), so such a CPU decodes
        # in fp32
        bf16 = bf16 and bf16_instructions(self.device) and _packed_bf16_available(self.device)
        layer_rows = (AMX_BF16_ROWS if amx else LAYER_BF16_ROWS) if bf16 else 0
        head_rows = (AMX_BF16_ROWS if amx else HEAD_BF16_ROWS) if bf16 else 0
        self.layers: list[_Layer] = []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight.detach().float(),
                    post_norm=layer.post_attention_layernorm.weight.detach().float(),
                    qkv=Projection(
                        torch.cat([p.weight for p in projections]), _cat_bias(*projections), bf16_rows=layer_rows
                    ),
                    o=Projection(attention.o_proj.weight, attention.o_proj.bias, bf16_rows=layer_rows),
                    gate_up=Projection(
                        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                        _cat_bias(mlp.gate_proj, mlp.up_proj),
                        bf16_rows=layer_rows,
                    ),
                    down=Projection(mlp.down_proj.weight, mlp.down_proj.bias, bf16_rows=layer_rows),
                )
            )
        self.norm = decoder.norm.weight.detach().float()
        head = lm.get_output_embeddings()
        self.head = Projection(head.weight, getattr(head, "bias", None), bf16_rows=head_rows) if need_logits else None
        positions = torch.arange(self.max_positions, device=self.device).unsqueeze(0)
        with torch.inference_mode():
            cos, sin = decoder.rotary_emb(torch.zeros(1, device=self.device), positions)
        # [positions, head_dim]; rotate_half(x)·sin = roll(x, D/2)·(sin with its first half negated): one roll
        # instead of two slices, a negation and a concatenation, for queries and keys together
        half = self.head_dim // 2
        self.cos = cos[0].float()
        self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).float()
        self.bytes_per_token = len(self.layers) * 2 * self.kv_heads * self.head_dim * 4

    def new_cache(self, slots: int, capacity: int) -> torch.Tensor:
        """An empty cache for ``slots`` rows of up to ``capacity`` tokens."""
        return torch.zeros((len(self.layers), 2, slots, self.kv_heads, capacity, self.head_dim), device=self.device)

    @torch.inference_mode()
    def forward(
        self,
        cache: torch.Tensor,
        first: int,
        tokens: torch.Tensor,
        starts: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Run ``tokens [B, n]`` (row ``b``'s first ``lengths[b]`` are real) at positions ``starts[b] + j``.

        Writes their keys and values into slots ``first …`` of ``cache`` and returns the final-norm hidden
        states ``[B, n, d]``. Padding positions compute junk that no real position attends to.
        """
        batch, width = tokens.shape
        positions = starts.unsqueeze(1) + torch.arange(width, device=tokens.device)  # [B, n]
        positions = positions.clamp(max=cache.shape[4] - 1)
        cos = self.cos[positions].unsqueeze(2)  # [B, n, 1, D]
        signed_sin = self.signed_sin[positions].unsqueeze(2)
        span = int((starts + lengths).max())
        keys = torch.arange(span, device=tokens.device)
        mask = keys.view(1, 1, span) <= positions.unsqueeze(-1)  # [B, n, T]: causal, per row
        mask = mask.unsqueeze(1).unsqueeze(1).expand(batch, 1, self.group, width, span)
        mask = mask.reshape(batch, 1, self.group * width, span)
        # additive once per step, rather than SDPA converting the boolean mask in every layer
        mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        rows = torch.arange(batch, device=tokens.device).unsqueeze(1)
        qk_size, kv_size = (self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim
        half = self.head_dim // 2
        hidden = F.embedding(tokens, self.embedding).float()
        for index, layer in enumerate(self.layers):
            normed = F.rms_norm(hidden, (self.hidden_size,), layer.input_norm, self.eps)
            qk, v = layer.qkv(normed).split((qk_size, kv_size), dim=-1)
            qk = qk.view(batch, width, self.heads + self.kv_heads, self.head_dim)
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), signed_sin)  # rotary, queries and keys at once
            layer_cache = cache[index, :, first : first + batch]
            layer_cache[0][rows, :, positions] = qk[:, :, self.heads :]
            layer_cache[1][rows, :, positions] = v.view(batch, width, self.kv_heads, self.head_dim)
            # grouped-query attention without copying keys: the `group` query heads of one key head are rows
            q = qk[:, :, : self.heads].transpose(1, 2).reshape(batch, self.kv_heads, self.group * width, self.head_dim)
            attended = F.scaled_dot_product_attention(
                q, layer_cache[0, :, :, :span], layer_cache[1, :, :, :span], attn_mask=mask
            )
            attended = attended.reshape(batch, self.heads, width, self.head_dim).transpose(1, 2)
            hidden = layer.o(attended.reshape(batch, width, self.heads * self.head_dim), residual=hidden)
            normed = F.rms_norm(hidden, (self.hidden_size,), layer.post_norm, self.eps)
            gate, up = layer.gate_up(normed).chunk(2, dim=-1)
            hidden = layer.down(self.act(gate) * up, residual=hidden)
        return F.rms_norm(hidden, (self.hidden_size,), self.norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, |V|]`` from final hidden states ``[B, d]``."""
        assert self.head is not None
        return self.head(hidden)


@dataclass
class _Entry:
    tokens: torch.Tensor  # [T] ids whose keys and values are stored
    caches: list[torch.Tensor]  # one per tower: [layers, 2, kv_heads, T, head_dim]
    used: float
    size: int


class PrefixCache:
    """Keys and values of recently decoded token sequences, so a prompt that extends one skips its prefix.

    A conversation's next prompt is its previous prompt + the reply + the new message: the longest stored
    sequence sharing its first tokens is found and copied instead of recomputed. Bounded by ``max_bytes``
    (least recently used first out) and by ``ttl_s`` of disuse, so a conversation's entry goes about when its
    session does; an entry that a longer one extends is replaced by it. Pinned entries (:meth:`pin`: the start
    every conversation shares) stay until :meth:`clear` is told to drop them, outside the byte bound.
    Thread-safe.
    """

    def __init__(self, *, max_bytes: int, ttl_s: float = 1800.0, min_tokens: int = 8) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._pinned: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self.bytes = 0
        #: prompt tokens served from the cache and tokens looked up (for logs and benchmarks)
        self.hit_tokens = 0
        self.lookup_tokens = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._pinned)

    def lookup(self, prompt: Sequence[int]) -> tuple[int | None, int, list[torch.Tensor]]:
        """``(entry id, matched tokens, caches)`` of the longest stored prefix of ``prompt`` (at most all but one)."""
        if len(prompt) < 2 or (self.max_bytes <= 0 and not self._pinned):
            return None, 0, []
        query = torch.tensor(list(prompt), dtype=torch.long)
        best: tuple[int | None, int, list[torch.Tensor]] = (None, 0, [])
        with self._lock:
            self._expire()
            for key, entry in [*self._pinned.items(), *self._entries.items()]:
                width = min(len(query) - 1, len(entry.tokens))
                if width <= best[1]:
                    continue
                differs = (entry.tokens[:width] != query[:width]).nonzero()
                matched = int(differs[0]) if len(differs) else width
                if matched > best[1]:
                    best = (key, matched, entry.caches)
            if best[0] in self._entries:
                self._entries[best[0]].used = time.monotonic()
                self._entries.move_to_end(best[0])
            self.lookup_tokens += len(query)
            self.hit_tokens += best[1]
        if best[1] < self.min_tokens:
            return None, 0, []
        return best

    def store(self, tokens: Sequence[int], caches: list[torch.Tensor], *, replaces: int | None = None) -> None:
        """Keep ``caches`` (``[layers, 2, kv_heads, T, head_dim]`` each, already copied) for ``tokens``."""
        size = sum(c.numel() * c.element_size() for c in caches)
        if len(tokens) < self.min_tokens or size > self.max_bytes:
            return
        entry = _Entry(torch.tensor(list(tokens), dtype=torch.long), caches, time.monotonic(), size)
        with self._lock:
            if replaces is not None and replaces in self._entries:  # never a pinned entry
                old = self._entries[replaces]
                if len(old.tokens) <= len(entry.tokens) and torch.equal(old.tokens, entry.tokens[: len(old.tokens)]):
                    self.bytes -= self._entries.pop(replaces).size
            self._entries[self._next_id] = entry
            self._next_id += 1
            self.bytes += size
            while self.bytes > self.max_bytes and self._entries:
                self.bytes -= self._entries.popitem(last=False)[1].size

    def pin(self, tokens: Sequence[int], caches: list[torch.Tensor]) -> None:
        """Keep ``caches`` for ``tokens`` until :meth:`clear` drops pinned entries (no bound, no expiry)."""
        entry = _Entry(
            torch.tensor(list(tokens), dtype=torch.long), caches, time.monotonic(), sum(c.nbytes for c in caches)
        )
        with self._lock:
            self._pinned[self._next_id] = entry
            self._next_id += 1

    def clear(self, *, pinned: bool = False) -> None:
        """Drop every conversation's entry, and the pinned ones too where ``pinned`` (the policy is closing)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0
            if pinned:
                self._pinned.clear()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.used >= cutoff:
                break
            self.bytes -= entry.size
            del self._entries[key]


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to answer; ``repeats > 1`` samples that many replies and keeps the best-scored one."""

    prompt: list[int]
    repeats: int = 1
    #: called in the engine's thread with the chosen reply tokens once it is finished (or cut short)
    on_done: Callable[[list[int]], None] | None = None
    #: called instead of ``on_done`` when a step failed (the batch is emptied)
    on_error: Callable[[BaseException], None] | None = None
    #: polled between steps: a request whose caller gave up leaves the batch at once
    cancelled: Callable[[], bool] | None = None
    result: list[int] | None = None
    score: float | None = None
    #: for logs and benchmarks: prompt tokens taken from the prefix cache
    cached_tokens: int = 0
    _rows: list[_Row] = field(default_factory=list)
    _finished_rows: int = 0


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    length: int  # tokens whose keys and values are in the slot
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    draining: bool = False  # finished, but its last token is fed once more for its features
    feature_sum: torch.Tensor | None = None
    state_feature: torch.Tensor | None = None
    stored_prefix: int | None = None  # prefix-cache entry this row's prompt extended


class DecodeEngine:
    """Decoding for one policy: towers (policy, and the value trunk where the method needs it), the prefix
    cache and the sampling rule; :meth:`new_batch` gives a :class:`RunningBatch` that requests join and leave.

    * plain sampling (base, BC, FBC, distilled RL actors): the policy tower only;
    * token-level ILQL: ``log π + β·(Q̄ − V)`` over the top-k, value features from the policy tower or from the
      base trunk run in lockstep (its own cache) when ``value_features == "base"``;
    * utterance-level reranking: K rows per prompt sharing the prompt's cache, scored at the end — policy
      features are summed while decoding; base features by one batched pass of the value trunk over the
      finished replies (cheaper than a lockstep decode, and only for the prompts that need it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        config: DecodeConfig,
        end_id: int,
        heads: ValueHeads | None = None,
        value_model: torch.nn.Module | None = None,
        max_rows: int = 16,
        max_batch_tokens: int = 16 * 1024,
        prefix_cache_bytes: int = 512 << 20,
        prefix_ttl_s: float = 1800.0,
    ) -> None:
        self.config = config
        self.end_id = end_id
        self.heads = heads
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        self.policy = Tower(model, bf16=config.bf16 is not False)
        self.embedding = causal_lm(model).get_output_embeddings().weight.detach().float()
        self.token_level = heads is not None and heads.config.level == "token" and config.beta != 0.0
        self.rerank = heads is not None and heads.config.level == "utterance" and config.candidates > 1
        self.value: Tower | None = None
        if value_model is not None and (self.token_level or self.rerank):
            self.value = Tower(value_model, bf16=config.bf16 is not False, need_logits=False)
        self.lockstep = self.token_level and self.value is not None  # the value trunk decodes beside π
        self.towers = [self.policy, self.value] if self.lockstep else [self.policy]
        self.prefix = PrefixCache(max_bytes=prefix_cache_bytes, ttl_s=prefix_ttl_s)
        #: one step at a time over the shared weights, whichever batch it belongs to (fair interleaving)
        self.lock = threading.Lock()
        # the value trunk's prompts for post-hoc utterance scoring, cached separately
        self.value_prefix = PrefixCache(max_bytes=prefix_cache_bytes // 4, ttl_s=prefix_ttl_s)

    def new_batch(
        self, *, generator: torch.Generator | None = None, should_stop: Callable[[], bool] | None = None
    ) -> RunningBatch:
        """An empty running batch (one per thread of control: the bot's worker, or one ``generate`` call)."""
        return RunningBatch(self, generator=generator, should_stop=should_stop)

    @torch.inference_mode()
    def pin(self, tokens: Sequence[int]) -> None:
        """Encode ``tokens`` once and keep their keys and values for good: the start every conversation shares
        (the system prompt and the opening line), so a new chat prefills only its own messages."""
        if len(tokens) < self.prefix.min_tokens:
            return
        ids, start, length = torch.tensor([list(tokens)]), torch.zeros(1, dtype=torch.long), torch.tensor([len(tokens)])
        value_only = [self.value] if self.value is not None and not self.lockstep else []
        with self.lock:
            for towers, prefix in ((self.towers, self.prefix), (value_only, self.value_prefix)):
                if not towers:
                    continue
                caches = [tower.new_cache(1, len(tokens)) for tower in towers]
                for tower, cache in zip(towers, caches, strict=True):
                    tower.forward(cache, 0, ids, start, length)
                prefix.pin(tokens, [cache[:, :, 0] for cache in caches])

    def repeats(self) -> int:
        """Rows per prompt: K when reranking utterances, else 1."""
        return max(self.config.candidates, 1) if self.rerank else 1

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        generator: torch.Generator | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[int]]:
        """One reply per prompt; at most ``max_rows`` rows decode at once, the rest join as rows finish."""
        requests = [GenerationRequest(list(p), repeats=self.repeats()) for p in prompts]
        batch = self.new_batch(generator=generator, should_stop=should_stop)
        waiting = list(reversed(requests))
        while waiting or batch.rows:
            if should_stop is not None and should_stop():
                break
            while waiting and batch.can_admit(waiting[-1]):
                batch.admit(waiting.pop())
            batch.step()
        batch.abandon()
        return [r.result if r.result is not None else [] for r in requests]


class RunningBatch:
    """The rows decoding together: requests join with :meth:`admit`, :meth:`step` advances every row one token
    (prefilling rows that joined since the last step first), and finished rows leave at once."""

    def __init__(
        self,
        engine: DecodeEngine,
        *,
        generator: torch.Generator | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.engine = engine
        self.generator = generator
        self.should_stop = should_stop
        self.rows: list[_Row] = []
        self._joining: list[GenerationRequest] = []
        self.caches: list[torch.Tensor] | None = None
        #: decode steps and prefills run (for benchmarks)
        self.steps = 0

    # --- admission ----------------------------------------------------------------------------------------

    def _budget(self, extra_rows: int, extra_length: int) -> int:
        rows = len(self.rows) + sum(r.repeats for r in self._joining) + extra_rows
        longest = max([extra_length, *(r.length + self.engine.config.max_new_tokens + 1 for r in self.rows)])
        return rows * longest

    def can_admit(self, request: GenerationRequest) -> bool:
        """Whether ``request`` fits the row limit and the memory bound now (an empty batch takes anything)."""
        if not self.rows and not self._joining:
            return True
        rows = len(self.rows) + sum(r.repeats for r in self._joining) + request.repeats
        if rows > self.engine.max_rows:
            return False
        length = len(request.prompt) + self.engine.config.max_new_tokens + 1
        return self._budget(request.repeats, length) <= self.engine.max_batch_tokens

    @property
    def size(self) -> int:
        """Rows decoding or about to join."""
        return len(self.rows) + sum(r.repeats for r in self._joining)

    def admit(self, request: GenerationRequest) -> None:
        """Join at the next :meth:`step` (the caller checked :meth:`can_admit`)."""
        self._joining.append(request)

    # --- cache management ---------------------------------------------------------------------------------

    def _ensure(self, slots: int, capacity: int) -> None:
        tower = self.engine.policy
        capacity = min(max(capacity, 16), tower.max_positions)
        if self.caches is not None and self.caches[0].shape[2] >= slots and self.caches[0].shape[4] >= capacity:
            return
        old = self.caches
        new_slots = max(slots, old[0].shape[2] if old is not None else 0)
        new_capacity = max(capacity, old[0].shape[4] if old is not None else 0)
        if old is not None and new_capacity > old[0].shape[4]:
            new_capacity = min(max(new_capacity, old[0].shape[4] * 3 // 2), tower.max_positions)
        fresh = [t.new_cache(new_slots, new_capacity) for t in self.engine.towers]
        if old is not None:
            for target, source in zip(fresh, old, strict=True):
                live = len(self.rows)
                target[:, :, :live, :, : source.shape[4]] = source[:, :, :live]
        self.caches = fresh

    def _remove(self, index: int) -> None:
        last = len(self.rows) - 1
        if index != last:
            assert self.caches is not None
            for cache in self.caches:
                length = self.rows[last].length
                cache[:, :, index, :, :length] = cache[:, :, last, :, :length]
            self.rows[index] = self.rows[last]
        self.rows.pop()
        if not self.rows and not self._joining:
            self.caches = None  # an idle batch holds no memory

    # --- stepping -----------------------------------------------------------------------------------------

    def step(self) -> None:
        """Prefill the rows that joined, then advance every row by one token; deliver finished requests."""
        with self.engine.lock:
            self._drop_cancelled()
            if self._joining:
                self._prefill()
            if self.rows:
                self._decode()
        self.steps += 1

    def abandon(self) -> None:
        """Stop now: unfinished requests are delivered with what they have (the policy is closing)."""
        for request in {id(r.request): r.request for r in self.rows}.values():
            self._deliver(request, cut=True)
        for request in self._joining:
            request.result = []
            if request.on_done is not None:
                request.on_done([])
        self.rows.clear()
        self._joining.clear()
        self.caches = None

    def fail(self, error: BaseException) -> None:
        """A step raised: every request in the batch gets ``error`` (or an empty reply), and the batch empties."""
        requests = list({id(r.request): r.request for r in self.rows}.values()) + self._joining
        self.rows.clear()
        self._joining.clear()
        self.caches = None
        for request in requests:
            request.result = []
            if request.on_error is not None:
                request.on_error(error)
            elif request.on_done is not None:
                request.on_done([])

    def _drop_cancelled(self) -> None:
        self._joining = [r for r in self._joining if r.cancelled is None or not r.cancelled()]
        index = 0
        while index < len(self.rows):
            request = self.rows[index].request
            if request.cancelled is not None and request.cancelled():
                self._remove(index)
            else:
                index += 1

    def _prefill(self) -> None:
        engine = self.engine
        joining, self._joining = self._joining, []
        plans: list[tuple[GenerationRequest, int | None, int, list[torch.Tensor]]] = []
        for request in joining:
            key, matched, cached = engine.prefix.lookup(request.prompt)
            request.cached_tokens = matched
            plans.append((request, key, matched, cached))
        first = len(self.rows)
        longest = max(len(r.prompt) for r in joining) + engine.config.max_new_tokens + 2
        self._ensure(first + sum(r.repeats for r in joining), longest)
        assert self.caches is not None
        # one slot per request while prefilling (first + i); its repeated rows copy it afterwards
        for offset, (_, _, matched, cached) in enumerate(plans):
            for cache, stored in zip(self.caches, cached, strict=False):  # nothing cached: no copies
                cache[:, :, first + offset, :, :matched] = stored[:, :, :, :matched]
        groups = _prefill_groups([len(r.prompt) - m for r, _, m, _ in plans])
        finals: list[list[torch.Tensor]] = [[] for _ in self.engine.towers]
        for start, stop in groups:
            part = plans[start:stop]
            width = max(len(r.prompt) - m for r, _, m, _ in part)
            tokens = torch.zeros((len(part), width), dtype=torch.long)
            for row, (request, _, matched, _) in enumerate(part):
                suffix = request.prompt[matched:]
                tokens[row, : len(suffix)] = torch.tensor(suffix)
            starts = torch.tensor([m for _, _, m, _ in part])
            lengths = torch.tensor([len(r.prompt) - m for r, _, m, _ in part])
            for tower_index, (tower, cache) in enumerate(zip(engine.towers, self.caches, strict=True)):
                hidden = tower.forward(cache, first + start, tokens, starts, lengths)
                finals[tower_index].append(hidden[torch.arange(len(part)), lengths - 1])
        last_hidden = [torch.cat(f) for f in finals]
        new_rows: list[_Row] = []
        for request, key, _, _ in plans:
            row = _Row(request, length=len(request.prompt), stored_prefix=key)
            request._rows = [row]
            new_rows.append(row)
        hidden_rows: list[int] = list(range(len(plans)))
        for index, (request, key, _, _) in enumerate(plans):
            if request.repeats == 1:
                continue
            source = first + index
            self._store(source, request.prompt, replaces=key)  # K replies of one prompt: keep it for next turn
            for _ in range(request.repeats - 1):
                target = first + len(new_rows)
                for cache in self.caches:
                    cache[:, :, target, :, : len(request.prompt)] = cache[:, :, source, :, : len(request.prompt)]
                row = _Row(request, length=len(request.prompt))
                request._rows.append(row)
                new_rows.append(row)
                hidden_rows.append(index)
        self.rows.extend(new_rows)
        order = torch.tensor(hidden_rows)
        hidden = [h[order] for h in last_hidden]
        self._sample(list(range(first, len(self.rows))), hidden)

    def _decode(self) -> None:
        engine = self.engine
        assert self.caches is not None
        rows = self.rows
        tokens = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long)
        starts = torch.tensor([r.length for r in rows])
        ones = torch.ones(len(rows), dtype=torch.long)
        needed = int(starts.max()) + 1
        if needed > self.caches[0].shape[4]:
            self._ensure(len(rows), needed + engine.config.max_new_tokens)
        hidden = [
            tower.forward(cache, 0, tokens, starts, ones)[:, 0]
            for tower, cache in zip(engine.towers, self.caches, strict=True)
        ]
        for row in rows:
            row.length += 1
        self._sample(list(range(len(rows))), hidden)

    def _sample(self, indices: list[int], hidden: list[torch.Tensor]) -> None:
        """Choose the next token of rows ``indices`` from their hidden states (one per tower)."""
        engine = self.engine
        config = engine.config
        rows = [self.rows[i] for i in indices]
        features = hidden[-1]  # the value trunk's in lockstep, else the policy's
        if engine.rerank and engine.value is None:  # utterance reranking on policy features: sum while decoding
            for position, row in enumerate(rows):
                if row.state_feature is None:
                    row.state_feature = features[position].clone()
                    row.feature_sum = torch.zeros_like(row.state_feature)
                else:
                    assert row.feature_sum is not None
                    row.feature_sum += features[position]
        active = [p for p, row in enumerate(rows) if not row.draining]
        if active:
            picked = torch.tensor(active)
            logits = engine.policy.logits(hidden[0][picked])
            advantage = None
            if engine.token_level:
                assert engine.heads is not None
                states = features[picked]

                def advantage(candidates: torch.Tensor) -> torch.Tensor:
                    assert engine.heads is not None
                    return token_advantages(engine.heads, engine.embedding, states, candidates).float()

            chosen = sample_tokens(logits, config, generator=self.generator, advantage=advantage)
            for position, token in zip(active, chosen, strict=True):
                row = rows[position]
                row.tokens.append(token)
                if token == engine.end_id or len(row.tokens) >= config.max_new_tokens:
                    if engine.rerank and engine.value is None:
                        row.draining = True  # its features need the hidden state of this last token too
                    else:
                        row.done = True
        for position, row in enumerate(rows):
            if row.draining and position not in active:
                row.done = True
        self._finish()

    def _finish(self) -> None:
        # from the end: a finished row's slot is filled by the last row, which is then a live one, so rows that
        # finish together leave without moving each other's caches
        for index in range(len(self.rows) - 1, -1, -1):
            row = self.rows[index]
            if not row.done:
                continue
            request = row.request
            request._finished_rows += 1
            if request.repeats == 1:
                # what the next turn's prompt starts with: the prompt and the reply fed so far
                fed = request.prompt + row.tokens[: row.length - len(request.prompt)]
                self._store(index, fed, replaces=row.stored_prefix)
            self._remove(index)
            if request._finished_rows == request.repeats:
                self._deliver(request, cut=False)

    def _store(self, slot: int, tokens: list[int], *, replaces: int | None) -> None:
        assert self.caches is not None
        length = len(tokens)
        copies = [cache[:, :, slot, :, :length].clone() for cache in self.caches]
        self.engine.prefix.store(tokens, copies, replaces=replaces)

    def _deliver(self, request: GenerationRequest, *, cut: bool) -> None:
        rows = request._rows
        if request.repeats == 1 or cut:
            request.result = rows[0].tokens if rows else []
        else:
            request.result, request.score = _choose(self.engine, request, rows)
        if request.on_done is not None:
            request.on_done(request.result)


def _prefill_groups(widths: list[int]) -> list[tuple[int, int]]:
    """Consecutive groups of prompts to prefill together: padding may waste at most a quarter of a group."""
    groups: list[tuple[int, int]] = []
    start = 0
    for stop in range(1, len(widths) + 1):
        if stop == len(widths):
            groups.append((start, stop))
            break
        part = widths[start : stop + 1]
        if max(part) * len(part) > 1.25 * sum(part) + 16:
            groups.append((start, stop))
            start = stop
    return groups


def sample_tokens(
    logits: torch.Tensor,
    config: DecodeConfig,
    *,
    generator: torch.Generator | None,
    advantage: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """Top-k sampling at ``config.temperature`` (greedy at 0); ILQL adds ``β·advantage`` to ``log π``.

    Without an advantage the top-k logits are used as they are: ``log π`` differs from them by one constant
    per row, which neither the softmax nor the argmax sees, so the 49k-wide log-softmax is skipped.
    """
    vocab = logits.shape[-1]
    k = min(config.top_k, vocab) if config.top_k > 0 else vocab
    if advantage is not None:
        scores, candidates = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        scores = scores + config.beta * advantage(candidates)
    else:
        scores, candidates = logits.float().topk(k, dim=-1)
    if config.temperature <= 0:
        choice = scores.argmax(-1)
    else:
        probabilities = torch.softmax(scores / config.temperature, dim=-1)
        choice = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
    return candidates.gather(-1, choice.unsqueeze(-1)).squeeze(-1).tolist()


def _choose(engine: DecodeEngine, request: GenerationRequest, rows: list[_Row]) -> tuple[list[int], float]:
    """The reply of ``rows`` (K samples of one prompt) with the highest ``Q̄(s, u) − V(s)``, and that score."""
    assert engine.heads is not None
    replies = [row.tokens for row in rows]
    if engine.value is None:
        states = torch.stack([row.state_feature for row in rows])  # type: ignore[misc]
        sums = torch.stack([row.feature_sum for row in rows])  # type: ignore[misc]
    else:
        states, sums = value_features(engine.value, engine.value_prefix, request.prompt, replies)
    lengths = torch.tensor([max(len(t), 1) for t in replies], dtype=torch.float32)
    with torch.inference_mode():
        scores = utterance_scores(engine.heads, states, sums / lengths.unsqueeze(-1)).float()
    empty = torch.tensor([not [t for t in reply if t != engine.end_id] for reply in replies])
    scores = scores.masked_fill(empty, float("-inf"))
    best = int(scores.argmax())
    return replies[best], float(scores[best])


@torch.inference_mode()
def value_features(
    tower: Tower, prefix: PrefixCache, prompt: list[int], replies: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden state at the prompt's end and the sum over each reply's tokens, from one pass of ``tower``.

    The prompt is encoded once (or found in ``prefix``); the K replies then run as one batch of rows that
    each start from a copy of its cache, so the value trunk never decodes token by token.
    """
    key, matched, cached = prefix.lookup(prompt)
    width = max(max(len(r) for r in replies), 1)
    cache = tower.new_cache(len(replies), len(prompt) + width + 1)
    if matched:
        cache[:, :, 0, :, :matched] = cached[0][:, :, :, :matched]
    suffix = torch.tensor([prompt[matched:]])
    state = tower.forward(cache, 0, suffix, torch.tensor([matched]), torch.tensor([len(prompt) - matched]))[0, -1]
    prefix.store(prompt, [cache[:, :, 0, :, : len(prompt)].clone()], replaces=key)
    for row in range(1, len(replies)):
        cache[:, :, row, :, : len(prompt)] = cache[:, :, 0, :, : len(prompt)]
    tokens = torch.zeros((len(replies), width), dtype=torch.long)
    for row, reply in enumerate(replies):
        tokens[row, : len(reply)] = torch.tensor(reply, dtype=torch.long)
    lengths = torch.tensor([max(len(r), 1) for r in replies])
    hidden = tower.forward(cache, 0, tokens, torch.full((len(replies),), len(prompt)), lengths)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor([len(r) for r in replies]).unsqueeze(1)).float()
    sums = (hidden * mask.unsqueeze(-1)).sum(1)
    return state.expand(len(replies), -1), sums
