"""The training algorithms by name, and the default: importable without torch (settings, CLI help)."""

from __future__ import annotations

from typing import Literal, get_args

#: bc (all dialogues), fbc (successful ones), critic-awr (per-turn critic → advantage-weighted actor), or
#: ilql / ilql-token / ilql-utterance (value heads on top of BC; ilql = ilql-utterance).
Algorithm = Literal["bc", "fbc", "critic-awr", "ilql", "ilql-token", "ilql-utterance"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
#: What `reverie train` and the improvement loop train unless told otherwise: the measured winner in BENCHMARKS.md
#: ("RL vs BC", bench/rl_vs_bc.py, filtered BC as its reference): travel 98.0 % vs filtered BC 61.5 % (+36.5,
#: +29.5…+43.5; 2026-12-04 — 98.0 % vs 93.0 % on another CPU, where FBC's greedy asking came out otherwise),
#: teaching 90.0 % vs 59.5 % (+30.5, +23.8…+37.2; 2026-12-01); BC, token-level ILQL and the base model below.
DEFAULT_ALGORITHM: Algorithm = "critic-awr"
