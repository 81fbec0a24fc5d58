"""The improvement loop's contract with its child steps: typed, versioned job files.

The loop writes what a step is to do as JSON of a dataclass (:class:`TrainJob`, :class:`EvalJob`) into the
run directory and starts ``reverie train --job FILE --out DIR`` or ``reverie eval --job FILE --out DIR``; the
child reads the file back with ``from_json``, which refuses a file of another :data:`JOB_SCHEMA_VERSION`.
The result comes back typed as well: the evaluation child writes ``report.json``, which the loop reads with
:meth:`learning.evaluation.EvaluationReport.from_json` and searches by the policy names the job gave.

What the job does not carry reaches the child as its environment (:meth:`bot.settings.Settings.as_env`): the
database URL, API keys and backend connection (secrets are never written to disk), logging and threads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

if TYPE_CHECKING:
    from bot.settings import Settings
    from learning.training import TrainConfig

#: The version of the job file format; a child refuses a job written for another one.
JOB_SCHEMA_VERSION = 1


class JobError(ValueError):
    """A job file that cannot be used (unreadable, malformed, another schema version); the message says why."""


def _load(source: str | Path, kind: str) -> dict[str, Any]:
    """The JSON object of a job file (a path) or job text, checked for its kind and schema version."""
    try:
        text = source.read_text(encoding="utf-8") if isinstance(source, Path) else source
        data = json.loads(text)
    except (OSError, ValueError) as error:
        raise JobError(f"{kind} job {source}: cannot be read: {error}") from error
    if not isinstance(data, dict):
        raise JobError(f"{kind} job {source}: not a JSON object")
    version = data.pop("schema_version", None)
    if version != JOB_SCHEMA_VERSION:
        raise JobError(f"{kind} job {source}: schema version {version!r}, this Reverie reads {JOB_SCHEMA_VERSION}")
    return data


def _dump(fields: dict[str, Any]) -> str:
    return json.dumps({"schema_version": JOB_SCHEMA_VERSION, **fields}, indent=2, ensure_ascii=False)


@dataclass(frozen=True)
class TrainJob:
    """``reverie train --job``: train one checkpoint with ``config`` on the dialogues of a JSONL file."""

    #: Every training setting (stored in the checkpoint's manifest as it is).
    config: TrainConfig
    #: ``DialogueRecord.to_dict()`` lines to train on.
    dialogues: str
    #: Continue from this checkpoint's adapter (``None``: from the base model).
    init_from: str | None = None

    def to_json(self) -> str:
        """The job file's text, with :data:`JOB_SCHEMA_VERSION`."""
        return _dump({"config": self.config.to_dict(), "dialogues": self.dialogues, "init_from": self.init_from})

    @classmethod
    def from_json(cls, source: str | Path) -> Self:
        """A job from a file (``Path``) or its text; :class:`JobError` when it cannot be used."""
        from learning.training import TrainConfig, TrainingError

        data = _load(source, "train")
        try:
            return cls(
                config=TrainConfig(**data["config"]), dialogues=str(data["dialogues"]), init_from=data.get("init_from")
            )
        except (KeyError, TypeError, TrainingError) as error:
            raise JobError(f"train job {source}: {type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class EvalJob:
    """``reverie eval --job``: compare named policies on the same simulated users."""

    #: Built-in task name or task TOML path.
    task: str
    #: Policy name in the report → what to load: ``base``, a checkpoint directory or ``scripted:<behaviour>``.
    policies: dict[str, str]
    #: ``scripted`` (objective reward) or ``llm`` (LLM-driven users and judge).
    users: Literal["scripted", "llm"]
    #: Episodes per policy (the same personas for all).
    episodes: int
    #: Seed of personas, users and sampling.
    seed: int
    #: Base model of the learned policies (``smollm2``, ``tiny`` or a path).
    base_model: str
    #: Keep the episodes in the database (``source="evaluation"``).
    store: bool = True
    #: Which personas and phrasings the simulated users take (``imagine.world.Split``): the gate uses the held-out
    #: value combinations and phrasings, never trained on.
    split: Literal["heldout", "train", "all"] = "heldout"

    def to_json(self) -> str:
        """The job file's text, with :data:`JOB_SCHEMA_VERSION`."""
        return _dump(asdict(self))

    @classmethod
    def from_json(cls, source: str | Path) -> Self:
        """A job from a file (``Path``) or its text; :class:`JobError` when it cannot be used."""
        data = _load(source, "eval")
        try:
            job = cls(**data)
        except TypeError as error:
            raise JobError(f"eval job {source}: {error}") from error
        if job.users not in ("scripted", "llm") or not job.policies or job.split not in ("heldout", "train", "all"):
            raise JobError(
                f"eval job {source}: users must be 'scripted' or 'llm', split 'heldout', 'train' or 'all', and "
                "policies not empty"
            )
        return job


def train_config(
    settings: Settings,
    *,
    algorithm: str,
    task: str,
    seed: int,
    base_model: str | None = None,
    real_ratio: float | None = None,
    steps: int | None = None,
    value_steps: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    time_limit_minutes: float | None = None,
) -> TrainConfig:
    """The training config of ``reverie train`` and of the improvement loop: the given values, else the settings'
    (``IMPROVE_REAL_RATIO``, ``IMPROVE_STEPS``, ``BASE_MODEL``, ``DEVICE``), else the trainer's defaults."""
    from learning.training import TrainConfig

    config = TrainConfig(
        algorithm=algorithm,  # type: ignore[arg-type]
        task=task,
        base_model=base_model or settings.base_model,
        cache_dir=str(settings.resolved_model_cache_dir),
        real_ratio=settings.improve_real_ratio if real_ratio is None else real_ratio,
        seed=seed,
        time_limit_minutes=time_limit_minutes,
        device=device or settings.device,
    )
    if steps or settings.improve_steps:
        config.steps = steps or settings.improve_steps  # type: ignore[assignment]
        config.critic.actor_steps = min(config.critic.actor_steps, config.steps)  # "at most" bounds both phases
    if value_steps is not None:
        config.value_steps = value_steps
    if batch_size is not None:
        config.batch_size = batch_size
    return config


def write_job(job: TrainJob | EvalJob, path: Path) -> Path:
    """Write ``job`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(job.to_json() + "\n", encoding="utf-8")
    return path
