"""What a reward means: the one definition of a successful dialogue, shared by every package.

Scripted users give 0 or 1, LLM judges a score in [0, 1], ``/end good|bad`` 1 or 0 and ``/rate n`` (n − 1)/4,
so "success" is a reward of at least one half: a ``/rate 3`` (0.5) or better counts, a ``/rate 2`` does not.
Training statistics, filtered BC, evaluation reports and the promotion gate all use :func:`is_success`.
"""

from __future__ import annotations

#: The smallest reward that counts as a success.
SUCCESS_THRESHOLD = 0.5


def is_success(reward: float | None) -> bool:
    """Whether a dialogue with this terminal reward succeeded (no reward: not a success)."""
    return reward is not None and reward >= SUCCESS_THRESHOLD
