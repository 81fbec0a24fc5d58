"""Data parallelism: this process's place among replicas launched by ``accelerate launch`` / ``torchrun``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from learning.devices import resolve_device


@dataclass
class Replicas:
    """This process's place among data-parallel replicas (``accelerate launch``/``torchrun``), or a lone process.

    Every replica holds the whole (small) LoRA model, draws its own batches and averages gradients before each
    optimizer step: DDP's arithmetic through accelerate's collectives (``accelerate.utils.reduce``). The main
    replica alone saves checkpoints and trains the value heads (cheap, on cached features).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def join(cls, device: str) -> Replicas:
        """Join the launched process group when ``WORLD_SIZE`` > 1; otherwise a single replica on ``device``."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(torch.device(resolve_device(device)))
        state = PartialState(cpu=resolve_device(device) == "cpu")
        return cls(state.device, state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        """Whether this replica writes files and logs progress."""
        return self.rank == 0

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the replicas (one all-reduce of the flattened gradients)."""
        if self.world_size == 1:
            return
        with_grad = [p for p in parameters if p.grad is not None]
        flat = reduce(torch.cat([p.grad.reshape(-1) for p in with_grad]), reduction="mean")
        for p, mean in zip(with_grad, flat.split([p.grad.numel() for p in with_grad]), strict=True):
            p.grad.copy_(mean.view_as(p.grad))

    def any(self, flag: bool) -> bool:
        """``flag`` on any replica (so that all of them take the same branch)."""
        if self.world_size == 1:
            return flag
        return bool(reduce(torch.tensor([float(flag)], device=self.device), reduction="max").item() > 0)

    def summary(self, parameters: Sequence[torch.nn.Parameter]) -> dict[str, Any]:
        """``world_size`` and, with several replicas, whether their trained weights are still identical."""
        if self.world_size == 1:
            return {"world_size": 1}
        checksum = torch.stack([p.detach().double().sum() for p in parameters]).sum().reshape(1)
        spread = reduce(torch.cat([checksum, -checksum]).to(self.device), reduction="max")
        in_sync = bool((spread[0] + spread[1]).abs().item() <= 1e-9 * max(1.0, abs(checksum.item())))
        return {"world_size": self.world_size, "replicas_in_sync": in_sync}

    def wait(self) -> None:
        """A barrier (no-op for a single replica)."""
        if self.world_size > 1:
            PartialState().wait_for_everyone()
