"""PolicyHolder: leases, atomic swap, closing the old policy only when its last turn ends."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from bot.policy_holder import PolicyHolder
from learning.interface import History, Policy


class CountingPolicy:
    """A Policy that records whether it was closed (and refuses to be used after)."""

    def __init__(self, name: str, version_id: int | None = None, fail_on_close: bool = False) -> None:
        self.name = name
        self.version_id = version_id
        self.closed = 0
        self.fail_on_close = fail_on_close

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        assert not self.closed
        return [self.name for _ in histories]

    async def respond(self, history: History) -> str:
        return self.respond_batch([history])[0]

    def close(self) -> None:
        self.closed += 1
        if self.fail_on_close:
            raise RuntimeError("close failed")


def test_counting_policy_implements_the_protocol() -> None:
    assert isinstance(CountingPolicy("x"), Policy)


def test_a_lease_keeps_the_swapped_out_policy_open_until_released() -> None:
    old, new = CountingPolicy("old", 1), CountingPolicy("new", 2)
    holder = PolicyHolder(old)
    assert (holder.name, holder.version_id) == ("old", 1)
    first, second = holder.current(), holder.current()
    assert holder.leases() == 2
    assert holder.swap(new) is old
    assert (holder.name, holder.version_id) == ("new", 2)
    with holder.current() as policy:
        assert policy is new  # new turns get the new policy at once
    with first as policy:
        assert policy is old  # a turn that started before the swap keeps its policy
    assert old.closed == 0
    second.release()
    second.release()  # idempotent: does not release someone else's lease
    assert old.closed == 1 and new.closed == 0
    assert holder.leases(old) == 0


class ThreadedPolicy(CountingPolicy):
    """A CountingPolicy whose decoding thread count can be set, as LearnedPolicy's can."""

    threads: int | None = None


def test_the_serving_thread_count_follows_the_active_policy_through_swaps() -> None:
    first, second, plain = ThreadedPolicy("a"), ThreadedPolicy("b"), CountingPolicy("c")
    holder = PolicyHolder(first, threads=2)
    assert first.threads == 2
    holder.set_threads(1)  # an improvement run's child starts
    assert (holder.threads, first.threads) == (1, 1)
    holder.swap(second)
    assert second.threads == 1  # a policy swapped in mid-run decodes with serving's share too
    holder.swap(plain)  # a policy without thread control is left as it is
    holder.set_threads(2)
    assert not hasattr(plain, "threads") and second.threads == 1 and holder.threads == 2


def test_swap_without_leases_closes_at_once_unless_asked_not_to() -> None:
    a, b, c = CountingPolicy("a"), CountingPolicy("b"), CountingPolicy("c")
    holder = PolicyHolder(a)
    holder.swap(b)
    assert a.closed == 1
    assert holder.swap(c, close_old=False) is b and b.closed == 0
    holder.swap(c)  # swapping in the active policy again never closes it
    assert c.closed == 0


def test_a_policy_that_fails_to_close_does_not_break_the_swap() -> None:
    holder = PolicyHolder(CountingPolicy("bad", fail_on_close=True))
    holder.swap(CountingPolicy("good"))
    assert holder.name == "good"


def test_close_closes_active_and_retiring_and_refuses_new_leases() -> None:
    old, new = CountingPolicy("old"), CountingPolicy("new")
    holder = PolicyHolder(old)
    lease = holder.current()
    holder.swap(new)
    holder.close()
    assert (old.closed, new.closed) == (1, 1)
    lease.release()
    assert old.closed == 1  # not closed twice
    with pytest.raises(RuntimeError, match="closed"):
        holder.current()


def test_swaps_from_other_threads_never_lose_a_lease() -> None:
    policies = [CountingPolicy(f"p{i}") for i in range(50)]
    holder = PolicyHolder(policies[0])
    errors: list[BaseException] = []

    def turns() -> None:
        try:
            for _ in range(2000):
                with holder.current() as policy:
                    assert not policy.closed
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=turns) for _ in range(3)]
    for worker in workers:
        worker.start()
    for policy in policies[1:]:
        holder.swap(policy)
    for worker in workers:
        worker.join()
    assert errors == []
    assert all(p.closed == 1 for p in policies[:-1]) and policies[-1].closed == 0
