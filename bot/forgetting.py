"""``/forget`` beyond the database: the files of dialogues the project wrote.

Two kinds of file hold users' words outside the database: an improvement run's input
(``DATA_DIR/runs/run-N/dialogues.jsonl``, deleted when the run ends but present while it trains, or left by a
process that was killed) and the files ``reverie dialogues export --out`` wrote (registered in the database).
Both are JSON Lines of :meth:`storage.DialogueRecord.to_dict`, whose ``id`` is the conversation id, and every
``/forget`` tombstone keeps the ids it deleted, so :func:`purge_forgotten` can rewrite any of them, at any time,
from any process that can reach the file: it is idempotent and cheap when there is nothing to remove.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from storage import Source, Store

logger = logging.getLogger(__name__)

#: The input file of an improvement run, inside its run directory.
RUN_INPUT = "dialogues.jsonl"


@dataclass
class PurgeReport:
    """What :func:`purge_forgotten` did."""

    files_rewritten: list[Path] = field(default_factory=list)
    dialogues_removed: int = 0
    unreachable: list[Path] = field(default_factory=list)  # registered exports this process cannot open


def run_inputs(data_dir: Path) -> list[Path]:
    """Every improvement-run input file under ``data_dir``."""
    return sorted((data_dir / "runs").glob(f"*/{RUN_INPUT}"))


def remove_dialogues(path: Path, conversation_ids: Iterable[int]) -> int:
    """Rewrite a JSON Lines file of dialogues without the real ones whose id is in ``conversation_ids``.

    The new content replaces the file atomically (a reader sees the old file or the new one). Returns how many
    dialogues were removed; lines that are not dialogues are kept as they are.
    """
    forgotten = set(conversation_ids)
    kept: list[str] = []
    removed = 0
    with path.open(encoding="utf-8") as stream:
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                kept.append(line)
                continue
            if isinstance(record, dict) and record.get("source") == Source.REAL and record.get("id") in forgotten:
                removed += 1
            else:
                kept.append(line)
    if removed:
        temporary = path.with_name(f".{path.name}.forgetting")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    return removed


async def purge_forgotten(store: Store, data_dir: Path) -> PurgeReport:
    """Remove every forgotten user's dialogues from run inputs under ``data_dir`` and from registered exports."""
    report = PurgeReport()
    forgotten = await store.forgotten_conversation_ids()
    if not forgotten:
        return report
    paths = [*run_inputs(data_dir), *(Path(p) for p in await store.export_paths())]
    for path in dict.fromkeys(paths):  # de-duplicated, in order
        try:
            removed = await asyncio.to_thread(remove_dialogues, path, forgotten)
        except FileNotFoundError:
            if path.name != RUN_INPUT:  # a run input vanishing is its run ending; an export moved is worth a line
                report.unreachable.append(path)
            continue
        except OSError as error:
            logger.warning("cannot remove forgotten dialogues from %s: %s", path, error)
            report.unreachable.append(path)
            continue
        if removed:
            report.files_rewritten.append(path)
            report.dialogues_removed += removed
    if report.dialogues_removed:
        logger.info(
            "removed %d forgotten dialogue(s) from %d file(s)", report.dialogues_removed, len(report.files_rewritten)
        )
    return report
