"""The quality benches run on a task of one's own given by path, not only on the built-ins: ``bench/rl_vs_bc.py``
(and ``bench/served_policy.py`` on its checkpoint) and ``bench/closed_loop.py`` in their ``--quick`` form (the tiny
model), as real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_task(tmp_path: Path) -> Path:
    """The houseplant example under another name, outside the repository."""
    path = tmp_path / "tasks" / "greenery.toml"
    path.parent.mkdir()
    shutil.copyfile(ROOT / "examples" / "houseplants.toml", path)
    path.write_text(path.read_text(encoding="utf-8").replace('name = "houseplants"', 'name = "greenery"', 1))
    return path


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def test_rl_vs_bc_runs_on_a_task_given_by_path(own_task: Path, tmp_path: Path) -> None:
    out = _run(
        "bench/rl_vs_bc.py", "--quick", "--task", str(own_task), "--policies", "fbc,careful",
        "--dialogues", "40", "--episodes", "6", "--work-dir", str(tmp_path / "work"), "--threads", "1",
    )  # fmt: skip
    summary = json.loads(out[out.index('{\n  "task"') :])
    assert summary["task"] == "greenery" and summary["persona_space"] == 36
    assert summary["eval_split"]["unseen_phrasings"] is True and summary["eval_split"]["unseen_episodes"] == 6
    assert summary["policies"]["careful"]["success"] == 1.0 and summary["policies"]["careful"]["re_ask_rate"] == 0.0
    assert (tmp_path / "work" / "greenery-quick" / "report" / "transcripts.md").is_file()
    # the same checkpoint alone and behind the bot's reply guard, on the same held-out users
    checkpoint = tmp_path / "work" / "greenery-quick" / "fbc"
    served = _run(
        "bench/served_policy.py", "--task", str(own_task), "--checkpoint", str(checkpoint),
        "--base-model", "tiny", "--episodes", "4", "--no-write",
    )  # fmt: skip
    assert "fbc + guard" in served and "guard replaced" in served


def test_closed_loop_runs_on_a_task_given_by_path(own_task: Path, tmp_path: Path) -> None:
    _run("bench/closed_loop.py", "--quick", "--task", str(own_task), "--out-dir", str(tmp_path), "--no-write")
    summary = json.loads((tmp_path / "closed_loop-greenery-quick.json").read_text(encoding="utf-8"))
    assert summary["task"] == "greenery" and summary["task_file"] == str(own_task) and summary["complete"]
    assert len(summary["cycles"]) == 2 and summary["cycles"][0]["run_status"] == "succeeded"
