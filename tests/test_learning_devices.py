"""Device choice and moving batches/feature tables (CUDA itself is exercised by bench/rl_vs_bc.py on a GPU)."""

from __future__ import annotations

import pytest
import torch

from learning.dataset import Batch
from learning.devices import resolve_device
from learning.training import TrainConfig
from learning.training.features import FeatureTable


def test_auto_picks_cuda_only_where_there_is_one() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a GPU")
def test_configured_cuda_falls_back_to_cpu_without_a_gpu() -> None:
    assert resolve_device("cuda") == "cpu"
    assert resolve_device("cuda:1") == "cpu"


def test_the_device_is_not_part_of_a_runs_identity() -> None:
    # a run interrupted on a GPU machine may resume on the CPU (and the other way round)
    assert TrainConfig(device="cpu").fingerprint() == TrainConfig(device="cuda").fingerprint()


def test_batches_and_feature_tables_move_whole() -> None:
    batch = Batch(
        *(
            torch.ones(2, 3, dtype=dtype)
            for dtype in (torch.long, torch.long, torch.bool, torch.float, torch.bool, torch.long)
        )
    )
    moved = batch.to("meta")
    assert all(getattr(moved, name).device.type == "meta" for name in Batch.__dataclass_fields__)
    assert moved.input_ids.dtype == torch.long and moved.rewards.dtype == torch.float
    table = FeatureTable(
        states=torch.zeros(4, 8),
        ends=None,
        actions=torch.arange(4),
        rewards=torch.tensor([0.0, 0.0, 0.0, 1.0]),
        dones=torch.tensor([False, False, False, True]),
        next_rows=torch.tensor([1, 2, 3, -1]),
        weights=torch.ones(4),
        decision=torch.ones(4, dtype=torch.bool),
        asks=torch.zeros(4, dtype=torch.bool),
        success=torch.ones(4, dtype=torch.bool),
    )
    on_meta = table.to("meta")
    assert on_meta.ends is None and len(on_meta) == 4
    assert {getattr(on_meta, n).device.type for n in FeatureTable.__dataclass_fields__ if n != "ends"} == {"meta"}


def test_native_bf16_follows_the_cpus_flags_and_a_measured_product(monkeypatch: pytest.MonkeyPatch) -> None:
    from learning import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "amx_available", lambda device: False)
    monkeypatch.setattr(devices, "_bf16_products_faster", lambda: True)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert devices.native_bf16(cpu)
    monkeypatch.setattr(devices, "_bf16_products_faster", lambda: False)  # a Xeon without AMX: no faster
    assert not devices.native_bf16(cpu)
    monkeypatch.setattr(devices, "_bf16_products_faster", lambda: True)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert not devices.native_bf16(cpu)
    monkeypatch.setattr(devices, "amx_available", lambda device: True)
    assert devices.native_bf16(cpu)
    assert devices.native_bf16(torch.device("cuda"))


def test_cpu_flags_are_read_from_linux() -> None:
    from learning.devices import _cpu_flags

    flags = _cpu_flags()
    assert isinstance(flags, frozenset)
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        assert any(flag.startswith("avx") for flag in flags)
