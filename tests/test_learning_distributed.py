"""The trainer data-parallel: two CPU replicas (gloo) train one LoRA policy.

``accelerate launch --multi_gpu`` starts its processes through ``torch.distributed.run`` (torchrun); on CPUs
accelerate wants MPI, so the test launches torchrun itself: the same environment contract (``WORLD_SIZE``,
``RANK``, ``MASTER_ADDR``/``PORT``) that accelerate's ``PartialState`` joins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagine.simulated import generate_scripted_dialogues
from imagine.task import load_task
from learning.checkpoint import load_manifest
from learning.interface import Message
from learning.policy import load_policy
from tests.fakes.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_two_replicas_train_one_policy_with_averaged_gradients(tmp_path: Path) -> None:
    dialogues = tmp_path / "dialogues.jsonl"
    records = generate_scripted_dialogues("travel", 16, seed=0)
    dialogues.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "ckpt"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    train = ["-m", "bot.cli", "train", "--algo", "ilql", "--base-model", "tiny", "--dialogues", str(dialogues)]
    train += ["--steps", "3", "--value-steps", "4", "--batch-size", "2", "--out", str(out), "--quiet"]
    env = os.environ | {"DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1", "LOG_LEVEL": "WARNING"}
    env["DEVICE"] = "cpu"  # gloo on CPUs even where a GPU is present
    result = subprocess.run(
        [*launch, *train], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = load_manifest(out)["metrics"]
    # both replicas stepped together and their adapters stayed identical (gradients were averaged)
    assert metrics["world_size"] == 2 and metrics["replicas_in_sync"] is True
    assert metrics["policy_steps"] == 3 and metrics["value_steps"] == 4
    policy = load_policy(out, task=load_task("travel"), base_model="tiny", max_new_tokens=4)
    try:
        assert len(policy.respond_batch([[Message("user", "Hi! Any ideas for my trip?")]], seed=0)) == 1
    finally:
        policy.close()
