"""Choosing the torch device: one rule for training, serving and evaluation."""

from __future__ import annotations


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
