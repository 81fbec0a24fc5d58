"""The training algorithms by name, and the default: importable without torch (settings, CLI help)."""

from __future__ import annotations

from typing import Literal, get_args

#: bc (all dialogues), fbc (successful ones), critic-awr (per-turn critic → advantage-weighted actor), or
#: ilql / ilql-token / ilql-utterance (value heads on top of BC; ilql = ilql-utterance).
Algorithm = Literal["bc", "fbc", "critic-awr", "ilql", "ilql-token", "ilql-utterance"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
#: What `reverie train` and the improvement loop train unless told otherwise: the measured winner in BENCHMARKS.md
#: ("RL vs BC", bench/rl_vs_bc.py). On travel (2026-12-01 07:56), with filtered BC as its reference, 94.0 % vs
#: filtered BC 84.5 % (+9.5, +4.2…+14.8); on teaching the previous recipe (BC reference) led filtered BC 66.5 % vs
#: 59.5 % (+7.0, not significant) — the new recipe is not yet measured there.
DEFAULT_ALGORITHM: Algorithm = "critic-awr"
