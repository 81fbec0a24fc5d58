"""The training algorithms by name, and the default: importable without torch (settings, CLI help)."""

from __future__ import annotations

from typing import Literal, get_args

#: bc (all dialogues), fbc (successful ones), critic-awr (per-turn critic → advantage-weighted actor), or
#: ilql / ilql-token / ilql-utterance (value heads on top of BC; ilql = ilql-utterance).
Algorithm = Literal["bc", "fbc", "critic-awr", "ilql", "ilql-token", "ilql-utterance"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
#: What `reverie train` and the improvement loop train unless told otherwise. It won the measured comparison in
#: BENCHMARKS.md ("RL vs BC", bench/rl_vs_bc.py) on both built-in tasks with imitation stopped at 400 steps; with
#: imitation run until the task probe fits, filtered BC measured higher on travel (93.0 % vs 78.0 %) and lower on
#: teaching (59.5 % vs 66.5 %, not significant): the choice is under review (issue 11).
DEFAULT_ALGORITHM: Algorithm = "critic-awr"
