"""Checkpoints: atomic writes, manifest hashes, corruption detection, base-model mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learning.checkpoint import (
    CheckpointError,
    check_base_model,
    load_manifest,
    save_checkpoint,
    sha256_file,
    verify_checkpoint,
)


def _payload(text: str):
    def write(directory: Path) -> None:
        (directory / "heads.safetensors").write_bytes(text.encode())
        (directory / "adapter_config.json").write_text("{}")

    return write


def test_round_trip_records_config_metrics_and_hashes(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "ckpt",
        write_files=_payload("weights"),
        base_model="tiny",
        algorithm="ilql-utterance",
        config={"steps": 3},
        metrics={"policy_bc": 0.5},
        data={"dialogues": 2},
    )
    manifest = load_manifest(path)
    assert manifest["base_model"] == "tiny" and manifest["algorithm"] == "ilql-utterance"
    assert manifest["config"] == {"steps": 3} and manifest["metrics"] == {"policy_bc": 0.5}
    assert manifest["files"]["heads.safetensors"] == sha256_file(path / "heads.safetensors")
    assert verify_checkpoint(path) == sha256_file(path / "manifest.json")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directories left behind


def test_corruption_missing_and_unexpected_files_are_detected(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "c", write_files=_payload("weights"), base_model="tiny", algorithm="bc", config={}
    )
    (path / "heads.safetensors").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match=r"heads\.safetensors is corrupt"):
        verify_checkpoint(path)
    (path / "heads.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(path)
    (path / "heads.safetensors").write_bytes(b"weights")
    verify_checkpoint(path)
    (path / "stray.bin").write_bytes(b"?")
    with pytest.raises(CheckpointError, match="not in the manifest"):
        verify_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_manifest(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_manifest(tmp_path / "absent")


def test_overwrite_is_atomic_and_a_failed_write_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "c"
    save_checkpoint(target, write_files=_payload("v1"), base_model="tiny", algorithm="bc", config={})
    save_checkpoint(target, write_files=_payload("v2"), base_model="tiny", algorithm="bc", config={})
    assert (target / "heads.safetensors").read_bytes() == b"v2"

    def failing(directory: Path) -> None:
        (directory / "heads.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, write_files=failing, base_model="tiny", algorithm="bc", config={})
    assert (target / "heads.safetensors").read_bytes() == b"v2"
    verify_checkpoint(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_mismatched_base_model_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c", write_files=_payload("w"), base_model="tiny", algorithm="bc", config={})
    manifest = json.loads((path / "manifest.json").read_text())
    check_base_model(manifest, "tiny", path)
    with pytest.raises(CheckpointError, match=r"trained on base model .tiny.*HuggingFaceTB/SmolLM2"):
        check_base_model(manifest, "HuggingFaceTB/SmolLM2-135M-Instruct", path)
