"""The decode engine gives what plain decoding gives: same greedy tokens as HF ``generate`` and ``decode``, same
samples under a seed, whether prompts are cached from an earlier turn, join a running batch late or share it
with rows that finish early; its memory stays bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from imagine.task import load_task
from learning.base_model import tiny_model
from learning.decoding import DecodeConfig, decode
from learning.engine import DecodeEngine, GenerationRequest, PrefixCache, Projection
from learning.ilql import ILQLConfig, ValueHeads
from learning.interface import Message
from learning.policy import LearnedPolicy

NEVER = -1  # no token ends a reply: every row runs to the budget


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object, list[list[int]]]:
    model, tokenizer = tiny_model()
    prompts = [
        tokenizer.encode("hello there, how are you"),
        tokenizer.encode("a much longer prompt than the first one, with more words in it"),
        tokenizer.encode("hi"),
    ]
    return model, tokenizer, prompts


def fp32(max_new_tokens: int = 12, temperature: float = 0.0, **kwargs: object) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, bf16=False, **kwargs)


def test_greedy_tokens_match_hf_generate_and_decode(tiny: tuple) -> None:
    model, tokenizer, prompts = tiny
    engine = DecodeEngine(model, config=fp32(), end_id=NEVER)
    ours = engine.generate(prompts)
    reference = decode(model, prompts, end_id=NEVER, pad_id=tokenizer.pad_token_id, config=fp32()).tokens
    assert ours == reference
    for prompt, tokens in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert out[0, len(prompt) :].tolist() == tokens


def test_samples_match_decode_under_a_seed(tiny: tuple) -> None:
    model, _, prompts = tiny
    config = fp32(temperature=1.0)
    reference = decode(
        model, prompts, end_id=NEVER, pad_id=0, config=config, generator=torch.Generator().manual_seed(3)
    ).tokens
    ours = DecodeEngine(model, config=config, end_id=NEVER).generate(
        prompts, generator=torch.Generator().manual_seed(3)
    )
    assert ours == reference and len({tuple(t) for t in ours}) == 3


def test_next_turn_reuses_the_cached_prefix_and_decodes_the_same(tiny: tuple) -> None:
    model, tokenizer, prompts = tiny
    config = fp32(temperature=1.0)
    cached = DecodeEngine(model, config=config, end_id=NEVER)
    first = cached.generate(prompts, generator=torch.Generator().manual_seed(0))
    next_turn = [p + r + tokenizer.encode(" and more please") for p, r in zip(prompts, first, strict=True)]
    before = cached.prefix.hit_tokens
    second = cached.generate(next_turn, generator=torch.Generator().manual_seed(1))
    # every prompt but the last token of the previous reply (sampled, never fed) came from the cache
    assert cached.prefix.hit_tokens - before == sum(len(p) + len(r) - 1 for p, r in zip(prompts, first, strict=True))
    uncached = DecodeEngine(model, config=config, end_id=NEVER, prefix_cache_bytes=0)
    assert uncached.generate(next_turn, generator=torch.Generator().manual_seed(1)) == second
    assert len(cached.prefix) == 3  # each conversation's longer entry replaced its first-turn one


def test_prefix_cache_is_bounded_and_expires() -> None:
    cache = PrefixCache(max_bytes=3 * 4 * 40, ttl_s=60.0, min_tokens=2)
    for start in range(5):
        tokens = list(range(start * 100, start * 100 + 10))
        cache.store(tokens, [torch.zeros(1, 2, 1, 10, 6)])  # 480 bytes each
    assert len(cache) == 1 and cache.bytes <= cache.max_bytes  # least recently used out first
    assert cache.lookup(list(range(400, 420)))[1] == 10 and cache.lookup(list(range(0, 20)))[1] == 0
    cache.ttl_s = 0.0
    assert cache.lookup(list(range(400, 420)))[1] == 0 and len(cache) == 0


def test_a_pinned_conversation_start_serves_every_chat_and_outlives_eviction_expiry_and_clear(tiny: tuple) -> None:
    model, tokenizer, prompts = tiny
    start = tokenizer.encode("system: you are a brief travel agent. agent: where to?")
    chats = [start + p for p in prompts]
    reference = DecodeEngine(model, config=fp32(), end_id=NEVER, prefix_cache_bytes=0).generate(chats)
    engine = DecodeEngine(model, config=fp32(), end_id=NEVER, prefix_cache_bytes=1)  # no conversation fits
    engine.pin(start)
    before = engine.prefix.hit_tokens
    assert engine.generate(chats) == reference
    assert engine.prefix.hit_tokens - before == len(start) * len(chats)  # each chat encoded only its own tokens
    engine.prefix.ttl_s = 0.0
    engine.prefix.clear()
    assert engine.prefix.lookup(chats[0])[1] == len(start)  # neither expiry nor a plain clear drops it
    engine.prefix.clear(pinned=True)  # the policy is closing
    assert engine.prefix.lookup(chats[0])[1] == 0 and len(engine.prefix) == 0


def test_a_conversation_extending_the_pinned_start_never_replaces_it() -> None:
    cache = PrefixCache(max_bytes=10_000, min_tokens=2)
    cache.pin(list(range(10)), [torch.zeros(1, 2, 1, 10, 6)])
    key, matched, _ = cache.lookup(list(range(15)))
    assert matched == 10
    cache.store(list(range(14)), [torch.zeros(1, 2, 1, 14, 6)], replaces=key)  # as a finished row does
    assert len(cache) == 2 and cache.lookup([*range(10), 99, 98])[1] == 10


def test_rows_join_a_running_batch_and_leave_when_done(tiny: tuple) -> None:
    model, _, prompts = tiny
    solo = [DecodeEngine(model, config=fp32(), end_id=NEVER, prefix_cache_bytes=0).generate([p])[0] for p in prompts]
    # the third prompt's first greedy token ends its reply: it leaves after one step while the others go on
    end_id = solo[2][0]
    engine = DecodeEngine(model, config=fp32(), end_id=end_id, prefix_cache_bytes=0)
    expected = [s[: s.index(end_id) + 1] if end_id in s else s for s in solo]
    batch = engine.new_batch()
    requests = [GenerationRequest(p) for p in prompts]
    batch.admit(requests[0])
    for _ in range(4):  # the first step prefills (one token) and decodes (another)
        batch.step()
    assert len(batch.rows) == 1 and len(batch.rows[0].tokens) == 5
    batch.admit(requests[1])
    batch.admit(requests[2])
    batch.step()
    assert requests[2].result == [end_id] and len(batch.rows) == (1 if expected[0] == requests[0].result else 2)
    while batch.rows:
        batch.step()
    assert [r.result for r in requests] == expected
    assert batch.caches is None  # an idle batch holds no cache memory


def test_admission_respects_the_row_limit_and_memory_bound(tiny: tuple) -> None:
    model, _, prompts = tiny
    engine = DecodeEngine(model, config=fp32(max_new_tokens=8), end_id=NEVER, max_rows=2, max_batch_tokens=60)
    batch = engine.new_batch()
    first = GenerationRequest(prompts[1])
    assert batch.can_admit(first)  # an empty batch takes anything
    batch.admit(first)
    assert not batch.can_admit(GenerationRequest(prompts[1]))  # 2 × (prompt + budget) > 60 tokens
    assert batch.can_admit(GenerationRequest(prompts[2]))
    batch.admit(GenerationRequest(prompts[2]))
    assert not batch.can_admit(GenerationRequest([1]))  # two rows already
    assert engine.generate(prompts * 3) == DecodeEngine(model, config=fp32(max_new_tokens=8), end_id=NEVER).generate(
        prompts * 3
    )


def test_token_level_ilql_with_a_lockstep_value_trunk_matches_decode(tiny: tuple) -> None:
    model, _, prompts = tiny
    value_model, _ = tiny_model(seed=1)
    heads = ValueHeads(64, model.config.vocab_size, ILQLConfig(level="token")).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.normal_(0, 0.5)
    config = fp32(beta=4.0)
    options = {"end_id": NEVER, "config": config, "heads": heads, "value_model": value_model}
    reference = decode(model, prompts, pad_id=0, **options).tokens
    assert DecodeEngine(model, **options).generate(prompts) == reference
    assert reference != decode(model, prompts, pad_id=0, end_id=NEVER, config=fp32()).tokens  # the heads mattered


def test_every_fp32_layout_of_a_projection_gives_the_same_product() -> None:
    torch.manual_seed(0)
    wide, narrow = torch.randn(256, 64) * 0.05, torch.randn(64, 256) * 0.05
    bias = torch.randn(256)
    for rows in (1, 3, 16, 40, 600):  # torch.mm, oneDNN's packed fp32 (wide, 2-512 rows), torch.mm again
        x = torch.randn(rows, 64)
        residual = torch.randn(rows, 256)
        projection = Projection(wide, bias, bf16_rows=0)
        assert torch.allclose(projection(x), F.linear(x, wide, bias), atol=1e-5)
        assert torch.allclose(projection(x, residual=residual), residual + F.linear(x, wide, bias), atol=1e-5)
        y = torch.randn(rows, 256)
        assert torch.allclose(Projection(narrow, None, bf16_rows=0)(y), F.linear(y, narrow), atol=1e-5)


def test_bf16_projection_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64) * 0.05, torch.randn(3, 64)
    exact = Projection(weight, None, bf16_rows=0)(x)
    fast = Projection(weight, None, bf16_rows=16)(x)
    assert fast.dtype == torch.float32 and torch.allclose(fast, exact, atol=0.02, rtol=0.02)
    assert torch.equal(Projection(weight, None, bf16_rows=2)(x), exact)  # 3 rows: above the bf16 limit


async def test_a_chat_joins_the_running_batch_without_waiting_for_it() -> None:
    model, tokenizer = tiny_model()
    task = load_task("travel")
    # Long enough that the first chat is still decoding when the second arrives, even on a fast idle machine
    # (60 tokens of the tiny model took under 50 ms there).
    config = DecodeConfig(max_new_tokens=600, temperature=1.0, top_k=0)
    policy = LearnedPolicy(model, tokenizer, task, name="t", algorithm="bc", decode_config=config, batch_window_ms=1)
    assert policy.engine is not None
    policy._end_id = policy.engine.end_id = NEVER
    try:
        first = asyncio.create_task(policy.respond([Message("user", "hello")]))
        while policy.batcher.requests_served == 0:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the first chat is decoding now
        second = await asyncio.wait_for(policy.respond([Message("user", "a quiet beach trip")]), 60)
        assert second.strip() and (await first).strip()
        assert policy.batcher.batches_served == 1 and policy.batcher.peak_rows == 2
        abandoned = asyncio.create_task(policy.respond([Message("user", "never mind")]))
        await asyncio.sleep(0)
        abandoned.cancel()  # its caller gave up: it never joins, nothing waits behind it
        assert await policy.respond([Message("user", "hi")])
    finally:
        policy.close()
