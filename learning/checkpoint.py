"""Checkpoints: a directory with the LoRA adapter, the value heads and a manifest, written atomically.

Layout::

    checkpoint/
      adapter_model.safetensors   LoRA weights (peft); absent for the prompted base model
      adapter_config.json
      heads.safetensors           ILQL value heads (absent for BC / filtered BC)
      manifest.json               base model, algorithm, config, metrics, data summary, sha256 of each file

The directory is assembled in a temporary sibling and renamed into place, so a reader sees either the old
checkpoint or the new one, never half of one. Loading verifies every file's hash against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
#: What a checkpoint's weights expect of their prompts. 2: every user turn carries the agent's note
#: (:mod:`learning.notes`); a policy trained on other prompts would read text it never saw, so it is refused.
#: Bump it whenever the notes' wording changes.
FORMAT_VERSION = 2
#: The ILQL value heads of a checkpoint (absent for policies that decode without them).
HEADS_FILE = "heads.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another base model."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    *,
    write_files: Callable[[Path], None],
    base_model: str,
    algorithm: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path.

    ``write_files(directory)`` writes the payload (adapter, heads) into a fresh directory; this function
    hashes every file it wrote, adds ``manifest.json`` and renames the directory to ``path``, replacing an
    existing checkpoint there.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is as readable as any other data file
    try:
        write_files(staging)
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "algorithm": algorithm,
            "created_at": datetime.now(UTC).isoformat(),
            "config": dict(config),
            "metrics": dict(metrics or {}),
            "data": dict(data or {}),
            "files": files,
            **dict(extra or {}),
        }
        manifest_path = staging / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), encoding="utf-8")
        with manifest_path.open("rb") as handle:
            os.fsync(handle.fileno())
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            retired.rmdir()
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's manifest (no hash check; see :func:`verify_checkpoint`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"{directory}: not a checkpoint (no {MANIFEST})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{directory}: {MANIFEST} is corrupt: {error}") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{directory}: {MANIFEST} lacks the file list")
    for key in ("base_model", "algorithm"):
        if not isinstance(manifest.get(key), str):
            raise CheckpointError(f"{directory}: {MANIFEST} lacks {key!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {manifest.get('format_version')!r}, but this Reverie reads format "
            f"{FORMAT_VERSION} (its prompts changed); train a new policy (`reverie improve`)"
        )
    return manifest


def verify_checkpoint(path: str | Path) -> str:
    """Check every file against the manifest's sha256; return the manifest's sha256 (the checkpoint's digest).

    Raises :class:`CheckpointError` naming the first missing, altered or unexpected file.
    """
    directory = Path(path)
    manifest = load_manifest(directory)
    for name, expected in manifest["files"].items():
        file_path = directory / name
        if not file_path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if sha256_file(file_path) != expected:
            raise CheckpointError(f"{directory}: {name} is corrupt (sha256 does not match the manifest)")
    listed = set(manifest["files"]) | {MANIFEST}
    unexpected = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()]
    unexpected = [name for name in unexpected if name not in listed]
    if unexpected:
        raise CheckpointError(f"{directory}: files not in the manifest: {', '.join(sorted(unexpected))}")
    return sha256_file(directory / MANIFEST)


def check_base_model(manifest: Mapping[str, Any], base_model_id: str, path: str | Path) -> None:
    """Refuse a checkpoint trained on another base model, with a message that says what to configure."""
    if manifest["base_model"] != base_model_id:
        raise CheckpointError(
            f"{path}: trained on base model {manifest['base_model']!r}, but {base_model_id!r} is loaded; "
            f"configure BASE_MODEL to match the checkpoint (or retrain)"
        )
