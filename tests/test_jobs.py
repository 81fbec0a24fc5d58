"""The improvement loop's typed contract with its children: job files and the evaluation report round-trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.jobs import JOB_SCHEMA_VERSION, EvalJob, JobError, TrainJob, train_config, write_job
from bot.settings import Settings
from learning.evaluation import EpisodeResult, EvaluationReport, PolicyResult


def test_train_job_round_trips_its_config_and_refuses_another_schema(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, base_model="tiny", improve_steps=7)
    config = train_config(settings, algorithm="ilql-token", task="travel", seed=3, value_steps=11)
    assert (config.steps, config.value_steps, config.seed, config.ilql.level) == (7, 11, 3, "token")
    path = write_job(TrainJob(config, "dialogues.jsonl", init_from=None), tmp_path / "train-job.json")
    loaded = TrainJob.from_json(path)
    assert loaded.config.to_dict() == config.to_dict() and loaded.config.fingerprint() == config.fingerprint()
    assert loaded.dialogues == "dialogues.jsonl" and loaded.init_from is None
    data = json.loads(path.read_text())
    assert data["schema_version"] == JOB_SCHEMA_VERSION
    data["schema_version"] = JOB_SCHEMA_VERSION + 1
    with pytest.raises(JobError, match="schema version"):
        TrainJob.from_json(json.dumps(data))
    data["schema_version"] = JOB_SCHEMA_VERSION
    data["config"]["no_such_field"] = 1
    with pytest.raises(JobError, match="no_such_field"):
        TrainJob.from_json(json.dumps(data))


def test_eval_job_round_trips_and_keeps_policy_names_in_order(tmp_path: Path) -> None:
    job = EvalJob(
        task="travel",
        policies={"candidate": "/ckpt/c", "active": "base"},
        users="scripted",
        episodes=4,
        seed=2,
        base_model="tiny",
    )
    loaded = EvalJob.from_json(write_job(job, tmp_path / "eval-job.json"))
    assert loaded == job and list(loaded.policies) == ["candidate", "active"]
    with pytest.raises(JobError):
        EvalJob.from_json(job.to_json().replace('"scripted"', '"robots"'))
    with pytest.raises(JobError):
        EvalJob.from_json("not json")


def test_evaluation_report_round_trips_through_json_and_is_searched_by_name() -> None:
    def result(name: str, rewards: list[float]) -> PolicyResult:
        episodes = [
            EpisodeResult(i, {"budget": "tight"}, "tight", [("agent", "Hi"), ("user", "hey")], r, "fit")
            for i, r in enumerate(rewards)
        ]
        return PolicyResult(name=name, version_id=None, episodes=episodes, seconds=1.5)

    now = datetime.now(UTC)
    report = EvaluationReport(
        "travel", "scripted", 0, 3, [result("active", [0, 1, 0]), result("candidate", [1, 1, 0.5])], now, now
    )
    loaded = EvaluationReport.from_json(report.to_json())
    assert loaded.to_dict() == report.to_dict()
    assert loaded.result("candidate").success_rate == 1.0 and loaded.result("active").success_rate == pytest.approx(
        1 / 3
    )
    assert loaded.result("active").episodes[0].turns == [("agent", "Hi"), ("user", "hey")]
    with pytest.raises(KeyError):
        loaded.result("missing")
    with pytest.raises(ValueError, match="not an evaluation report"):
        EvaluationReport.from_json('{"task": "travel"}')
