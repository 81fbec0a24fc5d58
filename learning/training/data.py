"""Training input: dialogues as JSONL (what the improvement loop and ``reverie dialogues export`` write)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learning.dataset import DatasetError, EncodedDialogue
from storage import DialogueRecord


def load_dialogues_jsonl(path: Path) -> list[DialogueRecord]:
    """Read ``DialogueRecord.to_dict()`` lines; :class:`DatasetError` names the bad line."""
    from storage.store import StoreError

    records: list[DialogueRecord] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: no such file") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(DialogueRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, StoreError, ValueError, TypeError) as error:
            raise DatasetError(f"{path}:{number}: not a dialogue: {error}") from error
    return records


def transitions_summary(items: Sequence[EncodedDialogue]) -> dict[str, Any]:
    """Transitions at token and at turn level (recorded in the checkpoint manifest)."""
    return {
        "transitions_token": sum(i.num_actions for i in items),
        "transitions_turn": sum(len(i.turn_end) for i in items),
    }
