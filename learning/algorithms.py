"""The training algorithms by name, and the default: importable without torch (settings, CLI help)."""

from __future__ import annotations

from typing import Literal, get_args

#: bc (all dialogues), fbc (successful ones), critic-awr (per-turn critic → advantage-weighted actor), or
#: ilql / ilql-token / ilql-utterance (value heads on top of BC; ilql = ilql-utterance).
Algorithm = Literal["bc", "fbc", "critic-awr", "ilql", "ilql-token", "ilql-utterance"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
#: What `reverie train` and the improvement loop train unless told otherwise: the measured winner in BENCHMARKS.md
#: ("RL vs BC", bench/rl_vs_bc.py, 2026-12-01, filtered BC as its reference): travel 98.0 % vs filtered BC 93.0 %
#: (+5.0, +0.9…+9.1), teaching 90.0 % vs 59.5 % (+30.5, +23.8…+37.2); BC, token-level ILQL and the base model below.
DEFAULT_ALGORITHM: Algorithm = "critic-awr"
