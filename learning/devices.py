"""Choosing the torch device: one rule for training, serving and evaluation."""

from __future__ import annotations

import functools
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


def bf16_instructions(device: torch.device) -> bool:
    """Whether this CPU has bf16 instructions (AMX tiles or AVX512-BF16) rather than emulating bf16 products
    with conversions: where it has none, bf16 weights only add work to a memory-bound decode step."""
    return device.type == "cpu" and (amx_available(device) or "avx512_bf16" in _cpu_flags())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 here, so that training under bf16 autocast is faster: on CUDA, with
    AMX tiles, and where the CPU has AVX512-BF16 and a one-time product (~0.2 s) confirms it — AMD's Zen 4 runs
    them at twice the fp32 rate (an imitation step 1.10 s vs 1.81 s on an EPYC), while on a Xeon without AMX
    tiles fp32 was as fast (see ``learning.engine``). Calls :func:`amx_available` first, which also sets AMX up."""
    if device.type == "cuda":
        return True
    if amx_available(device):
        return True
    return device.type == "cpu" and "avx512_bf16" in _cpu_flags() and _bf16_products_faster()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _bf16_products_faster(margin: float = 1.3) -> bool:
    """Whether a training-sized product (1024 × 576 by 576 × 1536) runs ``margin`` times faster in bf16 than in
    fp32 on this CPU (best of five each, after a warm-up)."""
    import time

    import torch

    def best_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        times = []
        for _ in range(6):
            started = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - started)
        return min(times[1:])

    rows, cols = torch.randn(1024, 576), torch.randn(576, 1536)
    return best_seconds(rows, cols) > margin * best_seconds(rows.bfloat16(), cols.bfloat16())
