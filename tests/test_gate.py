"""The promotion gate: paired over the same personas, never promoting a significantly worse candidate, and what the
run record and ``/status`` say about it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.events import ChatRef
from bot.improve import ImprovementLoop, PairedDifference, _gate_inputs, gate
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from imagine.task import load_task
from learning.checkpoint import save_checkpoint, verify_checkpoint
from learning.evaluation import EpisodeResult, EvaluationReport, PolicyResult
from storage import PolicyStatus, RunStatus, Store
from tests.offline_settings import offline_settings
from tests.test_service import ScriptedPolicy

TASK = load_task("travel")
ADMIN = ChatRef(platform="telegram", chat_id="7", user_id="7")


def _result(name: str, successes: list[bool]) -> PolicyResult:
    episodes = [
        EpisodeResult(
            index=i,
            persona={"i": i},
            persona_type="t",
            turns=[("agent", "hi")],
            reward=1.0 if ok else 0.0,
            outcome="fit" if ok else "misfit",
        )
        for i, ok in enumerate(successes)
    ]
    return PolicyResult(name=name, version_id=None, episodes=episodes)


def _report(path: Path, candidate: list[bool], active: list[bool]) -> Path:
    now = datetime.now(UTC)
    report = EvaluationReport(
        task="travel",
        users="scripted",
        seed=0,
        episodes=len(candidate),
        results=[_result("candidate", candidate), _result("active", active)],
        started_at=now,
        finished_at=now,
    )
    path.write_text(report.to_json(), encoding="utf-8")
    return path


def test_default_gate_uses_at_least_100_episodes_per_policy() -> None:
    assert Settings(_env_file=None).improve_eval_episodes >= 100


def test_a_significantly_worse_candidate_is_never_promoted_whatever_the_margin() -> None:
    worse = PairedDifference(mean=-0.05, low=-0.09, high=-0.01, episodes=100)
    assert worse.significantly_worse
    # Within the margin by success rate, but the paired interval lies entirely below 0.
    decision = gate(0.45, 0.50, margin=1.0, paired=worse)
    assert not decision.promote
    assert "significantly worse" in decision.reason and "95 % CI -9.0 to -1.0" in decision.reason
    # An interval that reaches 0 is not evidence of harm: the margin rule decides, as before.
    unclear = PairedDifference(mean=-0.05, low=-0.12, high=0.02, episodes=100)
    assert gate(0.45, 0.50, margin=0.10, paired=unclear).promote
    assert not gate(0.45, 0.50, margin=0.02, paired=unclear).promote
    better = PairedDifference(mean=0.10, low=0.04, high=0.16, episodes=100)
    assert gate(0.60, 0.50, margin=0.0, paired=better).promote


def test_gate_inputs_pair_the_episodes_of_one_report(tmp_path: Path) -> None:
    # 100 personas: both succeed on 40, the candidate loses 20 that the active policy won and wins 5 it lost.
    active = [True] * 60 + [False] * 40
    candidate = [True] * 40 + [False] * 20 + [True] * 5 + [False] * 35
    inputs = _gate_inputs(_report(tmp_path / "report.json", candidate, active))
    assert (inputs.candidate_success, inputs.active_success) == (0.45, 0.60)
    paired = inputs.paired
    assert paired.episodes == 100 and paired.mean == pytest.approx(-0.15)
    assert paired.low < paired.mean < paired.high < 0 and paired.significantly_worse
    # Equal policies: the interval is centred on 0.
    same = _gate_inputs(_report(tmp_path / "same.json", active, active)).paired
    assert same.mean == 0 and not same.significantly_worse


def _checkpoint(path: Path) -> Path:
    """A small intact checkpoint (never loaded: the candidate in these tests is rejected)."""
    return save_checkpoint(
        path, write_files=lambda d: (d / "adapter.bin").write_bytes(b"w"), base_model="tiny", algorithm="bc", config={}
    )


async def test_significantly_worse_candidate_is_rejected_and_status_shows_the_interval(
    sqlite_store: Store, tmp_path: Path
) -> None:
    settings = offline_settings(tmp_path, improve_margin=1.0)  # the margin alone would promote anything
    loop = ImprovementLoop(store=sqlite_store, settings=settings, task=TASK)
    inputs = _gate_inputs(_report(tmp_path / "report.json", [True] * 40 + [False] * 60, [True] * 60 + [False] * 40))
    run = await sqlite_store.start_training_run(trigger="test")
    candidate = _checkpoint(tmp_path / "runs" / "run-1" / "candidate")
    run = await loop.promote_or_reject(
        run,
        candidate,
        sha256=verify_checkpoint(candidate),
        candidate_success=inputs.candidate_success,
        active_success=inputs.active_success,
        paired=inputs.paired,
    )
    assert run.status == RunStatus.REJECTED
    assert (await sqlite_store.get_policy_version(run.candidate_version_id)).status == PolicyStatus.REJECTED
    assert await sqlite_store.active_policy_version() is None
    # The run record keeps the paired difference and its interval.
    metrics = run.metrics
    assert metrics["paired_difference"] == pytest.approx(-0.2) and metrics["eval_episodes"] == 100
    assert metrics["paired_ci_low"] < metrics["paired_ci_high"] < 0
    # /status shows it.
    service = DialogueService(
        store=sqlite_store, policies=PolicyHolder(ScriptedPolicy()), task=TASK, settings=settings, improver=loop
    )
    status = "\n".join(reply.text for reply in await service.handle_command(ADMIN, "status"))
    low, high = 100 * metrics["paired_ci_low"], 100 * metrics["paired_ci_high"]
    assert "rejected: candidate success 40.0% vs active 60.0%" in status
    assert f"paired difference -20.0 points (95 % CI {low:+.1f} to {high:+.1f}) over 100 personas" in status
    assert "significantly worse" in status
    await service.shutdown()


async def test_a_candidate_altered_after_its_evaluation_is_not_registered(sqlite_store: Store, tmp_path: Path) -> None:
    settings = offline_settings(tmp_path)
    loop = ImprovementLoop(store=sqlite_store, settings=settings, task=TASK)
    run = await sqlite_store.start_training_run(trigger="test")
    candidate = _checkpoint(tmp_path / "runs" / "run-1" / "candidate")
    evaluated = verify_checkpoint(candidate)
    _checkpoint(candidate)  # rewritten: another manifest (its creation time), so another digest
    from learning.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="changed since it was verified"):
        await loop.promote_or_reject(run, candidate, sha256=evaluated, candidate_success=1.0, active_success=0.0)
    assert await sqlite_store.list_policy_versions() == []
    assert not (settings.checkpoints_dir / "v-run1").exists()
