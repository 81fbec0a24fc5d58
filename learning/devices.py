"""Choosing the torch device: one rule for training, serving and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` where a GPU is available, else ``cpu``; anything else as configured.

    A configured ``cuda`` on a machine without one falls back to ``cpu`` rather than failing later inside
    torch with a less helpful message. torch is imported here, lazily, so callers that only parse settings
    stay light.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return device


def amx_available(device: torch.device) -> bool:
    """Whether bf16 matrix products run on AMX tiles here (``amx_bf16``, Sapphire Rapids and later; ``_init_amx``
    also asks Linux for the tile state). There bf16 is ~5× the fp32 rate for products of many rows — prefill, the
    frozen-layer pass — where without AMX fp32 is as fast or faster (see ``learning.engine``)."""
    import torch

    if device.type != "cpu":
        return False
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)  # private, hence the care
    try:
        return bool(init()) if init is not None else False
    except RuntimeError:
        return False
