"""A policy trained by hand serves like one the loop trained: ``reverie train`` (or ``reverie policies add``) registers
its checkpoint as a candidate version, ``reverie policies activate`` puts it in front of users, and a running bot
hot-swaps to it (``ImprovementLoop.sync_active``, what the server runs every minute)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.events import ChatRef
from bot.improve import ImprovementLoop
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from imagine.simulated.behaviour import generate_scripted_dialogues
from imagine.task import load_task
from learning.checkpoint import MANIFEST, verify_checkpoint
from learning.interface import Policy
from learning.policy import load_policy
from storage import Database, PolicyStatus, Store

TASK = load_task("travel")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: a fresh data directory with its SQLite database, the tiny model."""
    return {"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": "", "BASE_MODEL": "tiny", "LOG_LEVEL": "WARNING"}


@pytest.fixture
def runner() -> Iterator[CliRunner]:
    yield CliRunner()


def _versions(env: dict[str, str]) -> list:
    import asyncio

    async def read() -> list:
        database = Database(f"sqlite:///{Path(env['DATA_DIR']) / 'reverie.db'}")
        await database.create_schema()
        try:
            return await Store(database).list_policy_versions()
        finally:
            await database.dispose()

    return asyncio.run(read())


@pytest.fixture
def trained(tmp_path: Path, runner: CliRunner, env: dict[str, str]) -> Path:
    """``reverie train`` on scripted dialogues (tiny model, 2 steps), registering its checkpoint."""
    dialogues = tmp_path / "dialogues.jsonl"
    records = generate_scripted_dialogues("travel", 12, seed=3)
    dialogues.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "by-hand"
    args = ["train", "--algo", "bc", "--dialogues", str(dialogues), "--steps", "2", "--out", str(out), "--quiet"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # stdout stays the checkpoint's path alone
    assert "reverie policies activate 1" in " ".join(result.output.split())
    return out


def test_train_registers_a_candidate_that_activate_serves_in_a_running_bot(
    trained: Path, runner: CliRunner, env: dict[str, str]
) -> None:
    import asyncio

    [version] = _versions(env)
    assert version.status == PolicyStatus.CANDIDATE and Path(version.path) == trained.resolve()
    assert version.sha256 == verify_checkpoint(trained) and version.algorithm == "bc" and version.base_model == "tiny"
    assert version.metrics["registered_by"] == "reverie train"
    # Registering the same checkpoint again finds its version instead of adding one.
    again = runner.invoke(app, ["policies", "add", str(trained)], env=env)
    assert again.exit_code == 0, again.output
    assert len(_versions(env)) == 1

    async def serve_then_activate() -> tuple[int | None, int | None]:
        # A running bot: the prompted base model serves, as on a first start.
        settings = Settings(_env_file=None, data_dir=Path(env["DATA_DIR"]), base_model="tiny", log_level="WARNING")

        def loader(source: str, version_id: int | None) -> Policy:
            return load_policy(source, task=TASK, base_model="tiny", version_id=version_id, max_new_tokens=4)

        database = Database(settings.resolved_database_url)
        store = Store(database)
        holder = PolicyHolder(loader("base", None))
        loop = ImprovementLoop(store=store, settings=settings, task=TASK, holder=holder, load_policy=loader)
        service = DialogueService(store=store, policies=holder, task=TASK, settings=settings)
        try:
            assert not await loop.sync_active() and holder.version_id is None
            # The admin activates the hand-trained version from another process, as in production.
            result = await asyncio.to_thread(runner.invoke, app, ["policies", "activate", str(version.id)], env=env)
            assert result.exit_code == 0, result.output
            assert await loop.sync_active()  # what the server's watcher runs every minute
            chat = ChatRef(platform="telegram", chat_id="1", user_id="1")
            await service.handle_message(chat, "I love food")
            return holder.version_id, await _served_by(store)
        finally:
            await service.shutdown()
            holder.close()
            await database.dispose()

    served_version, reply_version = asyncio.run(serve_then_activate())
    assert served_version == version.id and reply_version == version.id
    [active] = _versions(env)
    assert active.status == PolicyStatus.ACTIVE


async def _served_by(store: Store) -> int | None:
    """The policy version of the last agent turn stored."""
    from sqlmodel import col, select

    from storage import Turn

    async with store.database.session() as session:
        turn = (await session.exec(select(Turn).where(Turn.role == "agent").order_by(col(Turn.id).desc()))).first()
    return turn.policy_version_id


def test_bad_paths_get_a_clear_error_and_change_nothing(
    tmp_path: Path, trained: Path, runner: CliRunner, env: dict[str, str]
) -> None:
    before = [(v.id, v.status) for v in _versions(env)]
    missing = runner.invoke(app, ["policies", "add", str(tmp_path / "nope")], env=env)
    assert missing.exit_code == 1 and "no such checkpoint directory" in missing.output
    assert "nothing was changed" in " ".join(missing.output.split())
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    result = runner.invoke(app, ["policies", "add", str(not_a_checkpoint)], env=env)
    assert result.exit_code == 1 and "not a checkpoint" in result.output
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained, corrupt)
    weights = sorted(corrupt.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    result = runner.invoke(app, ["policies", "add", str(corrupt)], env=env)
    assert result.exit_code == 1 and "corrupt" in result.output
    assert [(v.id, v.status) for v in _versions(env)] == before


def test_activate_refuses_a_checkpoint_replaced_since_it_was_registered(
    trained: Path, runner: CliRunner, env: dict[str, str]
) -> None:
    [version] = _versions(env)
    manifest = json.loads((trained / MANIFEST).read_text())
    manifest["created_at"] = "2000-01-01T00:00:00+00:00"  # still intact, but not what was registered
    (trained / MANIFEST).write_text(json.dumps(manifest))
    verify_checkpoint(trained)
    result = runner.invoke(app, ["policies", "activate", str(version.id)], env=env)
    assert result.exit_code == 1 and "was replaced" in " ".join(result.output.split())
    assert [v.status for v in _versions(env)] == [PolicyStatus.CANDIDATE]


def test_no_register_leaves_the_store_alone(tmp_path: Path, runner: CliRunner, env: dict[str, str]) -> None:
    dialogues = tmp_path / "dialogues.jsonl"
    records = generate_scripted_dialogues("travel", 8, seed=4)
    dialogues.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records), encoding="utf-8")
    args = ["train", "--algo", "bc", "--dialogues", str(dialogues), "--steps", "1", "--out", str(tmp_path / "c")]
    result = runner.invoke(app, [*args, "--quiet", "--no-register"], env=env)
    assert result.exit_code == 0, result.output
    assert _versions(env) == []
