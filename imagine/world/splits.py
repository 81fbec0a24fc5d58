"""Which phrasings and value combinations are trained on and which are held out for evaluation.

One rule everywhere: of a list of phrasings, every item at an index ``i % 4 == 1`` is held out (about a quarter,
never the first, so a one-item list stays all training); of the value combinations, those whose stable hash falls
below :data:`HELD_OUT_COMBINATIONS` are held out (at least one where the space has two or more).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal, TypeVar

T = TypeVar("T")

#: ``"train"``: what imagination trains on; ``"heldout"``: what evaluation reports separately; ``"all"``: both.
Split = Literal["train", "heldout", "all"]

#: Share of value combinations held out of training.
HELD_OUT_COMBINATIONS = 0.2


def split_items(items: Sequence[T], split: Split) -> tuple[T, ...]:
    """The items of ``split``; a held-out split of a one-item list falls back to that item."""
    if split == "all" or len(items) < 2:
        return tuple(items)
    held = tuple(item for index, item in enumerate(items) if index % 4 == 1)
    return held if split == "heldout" else tuple(item for index, item in enumerate(items) if index % 4 != 1)


def combination_hash(task_name: str, combination: Sequence[str]) -> float:
    """A stable number in [0, 1) for a value combination (the same in every process and run)."""
    digest = hashlib.blake2b(("\x1f".join((task_name, *combination))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
