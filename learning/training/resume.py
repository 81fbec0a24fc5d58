"""Periodic saves of an interrupted run (``.<out>.resume`` next to the output directory) and the final checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from learning.checkpoint import HEADS_FILE, save_checkpoint
from learning.dataset import EncodedDialogue
from learning.ilql import ValueHeads
from learning.lora import save_lora
from learning.training.config import TrainConfig
from learning.training.data import transitions_summary

logger = logging.getLogger(__name__)


def resume_dir(out_dir: Path) -> Path:
    """Where a run writing ``out_dir`` keeps its periodic saves."""
    return out_dir.parent / f".{out_dir.name}.resume"


def save_heads(heads: ValueHeads, directory: Path) -> None:
    """Write the value heads' weights (moved to the CPU) as ``heads.safetensors`` in ``directory``."""
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(directory / HEADS_FILE))


def tuple_state(value: Any) -> Any:
    """A ``random.getstate()`` read back from JSON (lists → tuples, as ``setstate`` wants)."""
    return tuple(tuple_state(v) for v in value) if isinstance(value, list) else value


def save_resume(
    directory: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    heads: ValueHeads | None,
    optimizer: torch.optim.Optimizer,
    value_optimizer: torch.optim.Optimizer | None,
) -> None:
    """Write the adapter, heads, optimizer states and ``state`` to ``directory`` atomically (staged, then renamed)."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_lora(model, staging)  # type: ignore[arg-type]
    if heads is not None:
        save_heads(heads, staging)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "value_optimizer": value_optimizer.state_dict() if value_optimizer else None,
        },
        staging / "optimizer.pt",
    )
    (staging / "state.json").write_text(json.dumps(state, default=str))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def load_resume(
    directory: Path,
    model: torch.nn.Module,
    heads: ValueHeads | None,
    optimizer: torch.optim.Optimizer,
    value_optimizer: torch.optim.Optimizer | None,
) -> None:
    """Restore what :func:`save_resume` wrote into the live model, heads and optimizers."""
    from peft import set_peft_model_state_dict

    adapter = load_file(str(directory / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, adapter)
    if heads is not None and (directory / HEADS_FILE).is_file():
        heads.load_state_dict(load_file(str(directory / HEADS_FILE)))
    saved = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(saved["optimizer"])
    if value_optimizer is not None and saved.get("value_optimizer"):
        value_optimizer.load_state_dict(saved["value_optimizer"])


def write_checkpoint(
    out_dir: Path,
    model: torch.nn.Module,
    heads: ValueHeads | None,
    config: TrainConfig,
    base_model_id: str,
    metrics: dict[str, Any],
    summary: Any,
    items: Sequence[EncodedDialogue],
    hidden_size: int,
    vocab_size: int,
) -> Path:
    """The final checkpoint: adapter (+ heads) with its manifest of config, metrics and data summary."""

    def write(directory: Path) -> None:
        save_lora(model, directory)  # type: ignore[arg-type]
        if heads is not None:
            save_heads(heads, directory)

    data = summary.to_dict() | transitions_summary(items)
    path = save_checkpoint(
        out_dir,
        write_files=write,
        base_model=base_model_id,
        algorithm=config.resolved_algorithm,
        config=config.to_dict(),
        metrics=metrics,
        data=data,
        extra={"task": config.task, "hidden_size": hidden_size, "vocab_size": vocab_size, "has_adapter": True},
    )
    heads_file = path / HEADS_FILE
    if heads_file.exists():
        logger.info(
            "value heads: %d parameters, %.1f MB", metrics.get("heads_parameters", 0), heads_file.stat().st_size / 1e6
        )
    return path
