"""The training configuration: every field documented where it is declared (CleanRL's ``Args``).

``reverie train`` builds its options from these fields (``bot/commands/train.py``); the improvement loop hands a
child the config as JSON (``bot.jobs.TrainJob``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from learning.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, Algorithm
from learning.ilql import ILQLConfig
from learning.training.critic import CriticConfig
from storage.rewards import SUCCESS_THRESHOLD


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad data, bad configuration); the message says why."""


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoint manifest); defaults measured on this CPU."""

    #: One of learning.algorithms.ALGORITHMS.
    algorithm: Algorithm = DEFAULT_ALGORITHM
    #: Built-in task name or task TOML path (its system prompt frames every dialogue).
    task: str = "travel"
    #: smollm2 (bundled), tiny (tests) or a local model directory / hub id.
    base_model: str = "smollm2"
    #: Where converted base models are kept (None: the default cache).
    cache_dir: str | None = None
    #: Policy-stage optimizer steps at most: the learning-rate schedule's length; early stopping on the held-out
    #: loss or the task probe (``fit_target``) may end sooner. Measured on travel (2400 scripted dialogues, seed 11,
    #: lr 3e-3): a 400-step schedule ended at probe fit 54 %; a 700-step one passed 88 % at step 450 and 96 % at 550 —
    #: the answers → activity mapping is learned late and at a varying step, so the cap is generous and the probe
    #: decides.
    steps: int = 700
    #: ILQL value-stage optimizer steps, on cached features.
    value_steps: int = 1500
    #: Dialogues per optimizer step (per micro-batch with grad_accum).
    batch_size: int = 16
    #: Micro-batches accumulated per optimizer step.
    grad_accum: int = 1
    #: Peak learning rate of the LoRA adapter (after warm-up; cosine decay to a tenth). Measured on travel (3600
    #: dialogues, 400 steps): at 1e-3 greedy replies at held-out full-knowledge states fit 53 % (the answers →
    #: activity mapping not learned); at 3e-3 they fit 91 %, held-out NLL 0.514 → 0.492.
    lr: float = 3e-3
    #: Fraction of the steps spent warming the learning rate up linearly.
    warmup: float = 0.05
    #: ILQL value heads' learning rate.
    value_lr: float = 1e-3
    #: Transitions per ILQL value step.
    value_batch_size: int = 256
    #: AdamW weight decay of the adapter.
    weight_decay: float = 0.0
    #: LoRA rank of the adapter's update matrices.
    lora_rank: int = 16
    #: LoRA alpha: the update is scaled by alpha / rank.
    lora_alpha: int = 32
    #: LoRA on the MLP projections too, not only attention (more capacity for task knowledge).
    lora_mlp: bool = True
    #: LoRA on the top this many decoder layers only; the rest are frozen and run once per dialogue
    #: (None: every layer, nothing cached).
    upper_layers: int | None = 4
    #: Longest training sequence in tokens; longer dialogues lose whole turns from the start.
    max_length: int = 512
    #: Share of real (logged) dialogues in each batch when both kinds exist.
    real_ratio: float = 0.3
    #: A real dialogue is drawn at most this many times as often as an imagined one (None: no cap), so a few real
    #: dialogues are not repeated until memorised. Measured in the closed loop (travel, 2400 imagined + 23 failed
    #: real conversations of the base model): uncapped, 30 % of every batch was those 23 — training loss 0.04 on
    #: them, held-out NLL 0.573, fit at full knowledge 25 %, the candidate 41 % on held-out users.
    real_max_weight: float | None = 4.0
    #: Relative weight per source (default 1 each).
    source_weights: dict[str, float] = field(default_factory=dict)
    #: Per-turn reward = this × mean 👍/👎 (−1..1) on that agent turn.
    thumbs_weight: float = 0.25
    #: Filtered BC keeps dialogues with at least this reward (the success threshold).
    fbc_min_reward: float = SUCCESS_THRESHOLD
    #: Fraction of dialogues held out for the held-out loss, the task probe and early stopping.
    held_out: float = 0.1
    #: Policy steps between held-out evaluations.
    eval_every: int = 50
    #: Held-out evaluations without improvement before stopping (0: never stop early).
    patience: int = 3
    #: Held-out states of each kind at which the policy's greedy reply is checked against the task (tasks whose
    #: world compiles): where everything is known (a fitting final act) and where something is still open (a
    #: question about an open preference, none about a given one; ``learning.training.probes``).
    probe_states: int = 24
    #: Filtered BC (so critic-awr's imitation phase, whichever its reference) stops once the greedy reply fits the
    #: task at this share of the probe states of every kind (None: never): the task is learned, further steps only
    #: cost time.
    #: Plain BC runs to its held-out optimum instead: its job is to reproduce the data, sampled replies included,
    #: which the greedy probe does not measure — on travel (3600 dialogues, bench/rl_vs_bc.py) BC stopped by the
    #: probe at step 350 (held-out NLL 0.499) succeeded 21 % sampled at T = 1 where its data's behaviours succeed
    #: 36 % on the same personas; run to 700 steps (NLL 0.482, flat from 500) 28 % (35 % vs 38 % on development
    #: personas). Runs with another objective (critic-awr's actor, ILQL) ignore it.
    fit_target: float | None = 0.9
    #: Seed of sampling, held-out split and initialisation.
    seed: int = 0
    #: bf16 autocast, fp32 master weights (None: where bf16 products beat fp32 — CUDA, AMX, AVX512-BF16 that a
    #: one-time product confirms — and fp32 elsewhere, see ``learning.devices.native_bf16``). On an AMD EPYC with
    #: AVX512-BF16 one imitation step (batch 16 travel dialogues, top 4 layers, 2 threads) took 1.10 s vs 1.81 s.
    bf16: bool | None = None
    #: bf16 for the ILQL value heads (None: token level only, whose CQL is |V| wide, where bf16 is native —
    #: emulated on an AVX2-only CPU it made the 600 value steps take over 30 minutes instead of a few).
    value_bf16: bool | None = None
    #: Policy steps between resumable saves.
    checkpoint_every: int = 100
    #: Stop (and save what was learned) after this many minutes.
    time_limit_minutes: float | None = None
    #: auto (CUDA where available), cpu or cuda.
    device: str = "auto"
    #: Directory where frozen-layer states are kept between runs on the same data (None: recompute).
    feature_cache_dir: str | None = None
    #: ILQL hyperparameters.
    ilql: ILQLConfig = field(default_factory=ILQLConfig)
    #: Per-turn critic and advantage weighting (critic-awr).
    critic: CriticConfig = field(default_factory=CriticConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ilql, dict):
            self.ilql = ILQLConfig(**self.ilql)
        if isinstance(self.critic, dict):
            self.critic = CriticConfig(**self.critic)
        if self.algorithm not in ALGORITHMS:
            raise TrainingError(f"unknown algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "ilql-token":
            self.ilql.level = "token"
        elif self.algorithm == "ilql-utterance":
            self.ilql.level = "utterance"

    @property
    def resolved_algorithm(self) -> str:
        """``bc``, ``fbc``, ``ilql-token`` or ``ilql-utterance`` (what the manifest records)."""
        if self.algorithm.startswith("ilql"):
            return f"ilql-{self.ilql.level}"
        return self.algorithm

    @property
    def uses_critic(self) -> bool:
        """Whether this run trains the per-turn critic and weights imitation by its advantages."""
        return self.algorithm == "critic-awr"

    @property
    def uses_values(self) -> bool:
        """Whether this run trains value heads."""
        return self.algorithm.startswith("ilql")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = dataclasses.asdict(self)
        data["ilql"] = self.ilql.to_dict()
        data["critic"] = dataclasses.asdict(self.critic)
        return data

    def fingerprint(self) -> str:
        """A hash of the settings that make a resumed run the same run."""
        data = self.to_dict()
        for volatile in ("time_limit_minutes", "checkpoint_every", "cache_dir", "device", "feature_cache_dir"):
            data.pop(volatile, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
