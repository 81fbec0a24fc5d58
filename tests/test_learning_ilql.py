"""ILQL loss terms on hand-made tensors: each term zero or not where it must be, expectile, targets, heads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from learning.ilql import (
    FactorizedQHead,
    FullVocabQHead,
    ILQLConfig,
    ValueHeads,
    bellman_target,
    cql_loss,
    expectile_loss,
    polyak_update,
    token_value_loss,
    utterance_value_loss,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small tensors: one thread avoids OpenMP stalls on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_expectile_loss_is_asymmetric() -> None:
    over = expectile_loss(torch.tensor([1.0]), tau=0.7)  # Q̄ above V: V should rise, weighted τ
    under = expectile_loss(torch.tensor([-1.0]), tau=0.7)  # Q̄ below V: weighted 1 − τ
    assert over.item() == pytest.approx(0.7)
    assert under.item() == pytest.approx(0.3)
    assert expectile_loss(torch.zeros(3), tau=0.7).item() == 0.0
    # with τ = ½ it is half the mean squared error
    assert expectile_loss(torch.tensor([2.0, -2.0]), tau=0.5).item() == pytest.approx(2.0)


def test_bellman_target_masks_done_and_clips_to_the_return_range() -> None:
    reward = torch.tensor([0.0, 1.0, 0.0])
    done = torch.tensor([False, True, False])
    next_value = torch.tensor([0.5, 9.0, 5.0], requires_grad=True)
    target = bellman_target(reward, done, next_value, gamma=0.9, return_range=(0.0, 1.0))
    assert target.tolist() == pytest.approx([0.45, 1.0, 1.0])  # done ignores V(s′); 4.5 is clipped to 1
    assert not target.requires_grad


def test_polyak_update_moves_targets_a_fraction_alpha() -> None:
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    polyak_update(target, online, alpha=0.25)
    assert target.weight.flatten().tolist() == pytest.approx([0.25, 0.25])
    polyak_update(target, online, alpha=1.0)
    assert target.weight.flatten().tolist() == pytest.approx([1.0, 1.0])


def test_cql_is_small_only_when_the_taken_action_dominates() -> None:
    uniform = torch.zeros(1, 100)
    assert cql_loss(uniform, uniform[:, 0]).item() == pytest.approx(torch.log(torch.tensor(100.0)).item())
    peaked = torch.full((1, 100), -20.0)
    peaked[0, 3] = 20.0
    assert cql_loss(peaked, peaked[:, 3]).item() == pytest.approx(0.0, abs=1e-6)
    assert cql_loss(peaked, peaked[:, 4]).item() > 39.0


def _token_heads(vocab: int = 16, d: int = 8, **overrides: float) -> ValueHeads:
    torch.manual_seed(0)
    return ValueHeads(d, vocab, ILQLConfig(level="token", **overrides))


def test_token_loss_terms_vanish_exactly_at_their_fixed_points() -> None:
    heads = _token_heads(cql_weight=0.0, gamma=1.0)
    embedding = torch.randn(16, 8)
    states, next_states = torch.randn(4, 8), torch.randn(4, 8)
    actions = torch.tensor([1, 2, 3, 4])
    dones = torch.ones(4, dtype=torch.bool)
    # freshly initialised heads output 0 everywhere: with r = 0 and done, Q = target and V = Q̄
    zero = token_value_loss(heads, embedding, states, actions, torch.zeros(4), dones, next_states, (0.0, 1.0))
    assert zero.terms["q"] == 0.0 and zero.terms["v"] == 0.0 and "cql" not in zero.terms
    rewarded = token_value_loss(heads, embedding, states, actions, torch.ones(4), dones, next_states, (0.0, 1.0))
    assert rewarded.terms["q"] == pytest.approx(2.0)  # Σᵢ (0 − 1)² over the twins
    assert rewarded.terms["v"] == 0.0  # V follows the *target* Q̄, which did not move
    with_cql = _token_heads(cql_weight=0.5)
    terms = token_value_loss(with_cql, embedding, states, actions, torch.ones(4), dones, next_states, (0.0, 1.0)).terms
    assert terms["cql"] == pytest.approx(2 * torch.log(torch.tensor(16.0)).item(), rel=1e-4)


def test_token_loss_trains_q_towards_reward_and_v_towards_the_upper_expectile() -> None:
    heads = _token_heads(cql_weight=0.0, polyak=1.0, tau=0.9)
    embedding = torch.randn(16, 8)
    state = torch.randn(1, 8).expand(64, 8)
    actions = torch.tensor([5, 6]).repeat(32)  # same state, two actions: one rewarded
    rewards = (actions == 5).float()
    dones = torch.ones(64, dtype=torch.bool)
    optimizer = torch.optim.Adam(heads.trainable_parameters(), lr=2e-2)
    for _ in range(120):
        loss = token_value_loss(heads, embedding, state, actions, rewards, dones, state, (0.0, 1.0)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        heads.update_targets()
    q = heads.q1.at(state[:2], torch.tensor([5, 6]), embedding)
    assert q[0].item() == pytest.approx(1.0, abs=0.05) and q[1].item() == pytest.approx(0.0, abs=0.05)
    assert 0.75 < heads.v(state[:1]).item() < 1.0  # τ = 0.9 expectile of {0, 1}: 0.9


def test_utterance_loss_and_gradients_reach_only_value_heads() -> None:
    heads = ValueHeads(8, 16, ILQLConfig(level="utterance"))
    states, ends = torch.randn(3, 8), torch.randn(3, 8)
    result = utterance_value_loss(
        heads, states, ends, torch.tensor([0.0, 0.0, 1.0]), torch.tensor([False, False, True]), states, (0.0, 1.0)
    )
    result.loss.backward()
    assert result.terms["q"] > 0
    assert all(p.grad is None for p in heads.target_q1.parameters())
    assert heads.q1.out.weight.grad is not None and heads.q1.out.weight.grad.abs().sum() > 0


def test_factorized_head_is_far_smaller_than_a_full_vocabulary_head() -> None:
    d, vocab, width = 64, 4096, 128
    factorized = FactorizedQHead(d, vocab, width)
    full = FullVocabQHead(d, vocab, width)
    embedding = torch.randn(vocab, d)
    features = torch.randn(2, d)
    assert factorized.all(features, embedding).shape == full.all(features, embedding).shape == (2, vocab)
    small = sum(p.numel() for p in factorized.parameters())
    large = sum(p.numel() for p in full.parameters())
    assert small == 2 * d * width + width + d + vocab
    assert large > 4 * small
    # Q(s, a) for k candidates equals the gathered full row
    candidates = torch.tensor([[1, 2, 3], [4, 5, 6]])
    picked = factorized.at(features, candidates, embedding)
    assert torch.allclose(picked, factorized.all(features, embedding).gather(-1, candidates), atol=1e-5)
