"""The improvement loop: a real run end to end, and its faults (killed trainer, corrupt candidate, worse
candidate, a busy database, a swap under load, shutdown while training).

Steps run as real child processes (``reverie imagine|train|eval``) on the tiny model with scripted users.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.events import ChatRef
from bot.improve import ImprovementLoop, gate
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from imagine.simulated.behaviour import generate_and_save, generate_scripted_dialogues
from imagine.task import load_task
from learning.interface import Policy
from learning.policy import load_policy
from storage import Database, PolicyStatus, RunStatus, Store
from storage.store import PolicyChangedError

TASK = load_task("travel")


def improve_settings(data_dir: Path, **overrides: object) -> Settings:
    """Small, fast improvement runs on the tiny model."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "base_model": "tiny",
        "imagine_backend": "scripted",
        "improve_imagined": 0,
        "improve_steps": 4,
        "improve_value_steps": 10,
        "improve_eval_episodes": 4,
        "improve_margin": 1.0,  # promote unless worse by more than 100 points: these tests are about mechanics
        "improve_on_first_start": False,
        "max_new_tokens": 8,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def tiny_loader(source: str, version_id: int | None) -> Policy:
    return load_policy(source, task=TASK, base_model="tiny", version_id=version_id, max_new_tokens=8)


@pytest.fixture
async def improve_store(tmp_path: Path) -> AsyncIterator[Store]:
    database = Database(f"sqlite:///{tmp_path / 'reverie.db'}")
    await database.create_schema()
    store = Store(database)
    await generate_and_save(store, "travel", 24, seed=0)
    yield store
    await database.dispose()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, few-step) BC checkpoint, trained in-process once for the tests that need one."""
    from learning.training import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "bc"
    config = TrainConfig(algorithm="bc", task="travel", base_model="tiny", steps=3, batch_size=4)
    return train(config, generate_scripted_dialogues("travel", 16, seed=1), out_dir=out, progress=False)


def _processes_with(fragment: str) -> list[int]:
    """PIDs whose command line contains ``fragment`` (the trainer of one run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fragment in cmdline and "bot.cli" in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


async def _wait_for_trainer(run_dir_fragment: str, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _processes_with(run_dir_fragment)
        if pids:
            return pids[0]
        await asyncio.sleep(0.2)
    raise AssertionError("the trainer never started")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


async def _turns_of(store: Store, chat: ChatRef) -> list:
    """The turns of the (single) conversation of ``chat``'s user."""
    from sqlmodel import select

    from storage import Conversation

    async with store.database.session() as session:
        conversation = (await session.exec(select(Conversation).where(Conversation.user_key == chat.user_key))).one()
    return await store.get_turns(conversation.id)


def test_gate_promotes_unless_worse_by_more_than_the_margin() -> None:
    assert gate(0.50, 0.50, 0.0).promote
    assert gate(0.49, 0.50, 0.02).promote
    assert not gate(0.47, 0.50, 0.02).promote
    assert "rejected" in gate(0.1, 0.5, 0.0).reason and "promoted" in gate(0.6, 0.5, 0.0).reason


async def test_killed_trainer_fails_the_run_and_the_active_policy_keeps_serving(
    improve_store: Store, tmp_path: Path
) -> None:
    settings = improve_settings(tmp_path, improve_steps=100_000)
    base = tiny_loader("base", None)
    holder = PolicyHolder(base)
    loop = ImprovementLoop(store=improve_store, settings=settings, task=TASK, holder=holder, load_policy=tiny_loader)
    run_task = asyncio.create_task(loop.run_once(trigger="test"))
    run_dir = tmp_path / "runs" / "run-1"
    trainer = await _wait_for_trainer(str(run_dir / "candidate"))
    share, idle = settings.resolved_torch_threads, settings.resolved_idle_torch_threads
    assert share < idle or (os.cpu_count() or 1) < 2  # on 2 CPUs: 1 while training, 2 between runs
    assert holder.threads == base.threads == share  # serving keeps its share while the child trains
    # Kill it once it has written something: its periodic resume state (LoRA weights trained on the dialogues) —
    # critic-awr from the base model is in its imitation phase, which trains into `.candidate.fbc` beside it
    # (`.candidate.bc` where no dialogue succeeded).
    names = (".candidate.resume", "..candidate.fbc.resume", "..candidate.bc.resume")
    resume_states = [run_dir / name / "state.json" for name in names]
    deadline = time.monotonic() + 120
    while not any(state.exists() for state in resume_states):
        assert time.monotonic() < deadline and _alive(trainer), "the trainer never wrote its resume state"
        await asyncio.sleep(0.1)
    assert (run_dir / "dialogues.jsonl").is_file()
    os.kill(trainer, signal.SIGKILL)
    run = await asyncio.wait_for(run_task, 60)
    assert run.status == RunStatus.FAILED and "exit -9" in run.error
    assert not _alive(trainer)
    # Nothing partial and none of the training input is left: only the step's log.
    assert sorted(p.name for p in run_dir.iterdir()) == ["train.log"]
    assert list(tmp_path.rglob("*.safetensors")) == []
    assert holder.active is base and await improve_store.active_policy_version() is None
    assert holder.threads == base.threads == idle  # and all the CPUs again once it is over
    assert await improve_store.list_policy_versions() == []
    holder.close()


async def test_shutdown_while_training_cancels_the_run_and_ends_the_trainer(
    improve_store: Store, tmp_path: Path
) -> None:
    settings = improve_settings(tmp_path, improve_steps=100_000)
    loop = ImprovementLoop(store=improve_store, settings=settings, task=TASK)
    message = await loop.request_run(trigger="admin", requested_by="telegram:1")
    assert "started" in message
    assert "already" in await loop.request_run(trigger="admin", requested_by="telegram:1")
    trainer = await _wait_for_trainer(str(tmp_path / "runs" / "run-1" / "candidate"))
    await loop.shutdown()
    run = await improve_store.last_training_run()
    assert run.status == RunStatus.CANCELLED and run.finished_at is not None
    for _ in range(100):
        if not _alive(trainer):
            break
        await asyncio.sleep(0.1)
    assert not _alive(trainer)
    assert not (tmp_path / "runs" / "run-1" / "candidate").exists()


async def test_corrupt_candidate_is_rejected_by_hash(improve_store: Store, tmp_path: Path) -> None:
    settings = improve_settings(tmp_path)
    loop = ImprovementLoop(store=improve_store, settings=settings, task=TASK)
    candidate = tmp_path / "runs" / "run-1" / "candidate"

    def corrupt(step: str) -> None:
        if step == "evaluate":  # the trainer has finished: damage one weight file
            weights = sorted(candidate.glob("*.safetensors"))[0]
            weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)

    loop.on_step = corrupt
    run = await loop.run_once(trigger="test")
    assert run.status == RunStatus.FAILED
    assert "sha256" in run.error.lower() or "hash" in run.error.lower()
    assert not candidate.exists() and await improve_store.list_policy_versions() == []


async def test_worse_candidate_is_registered_but_not_promoted(
    improve_store: Store, tmp_path: Path, trained_checkpoint: Path
) -> None:
    import shutil

    from learning.checkpoint import verify_checkpoint

    settings = improve_settings(tmp_path, improve_margin=0.02, keep_versions=1)
    base = tiny_loader("base", None)
    holder = PolicyHolder(base)
    loop = ImprovementLoop(store=improve_store, settings=settings, task=TASK, holder=holder, load_policy=tiny_loader)
    for number, (candidate_success, active_success) in enumerate([(0.30, 0.50), (0.55, 0.50)], start=1):
        run = await improve_store.start_training_run(trigger="test")
        candidate = tmp_path / f"candidate-{number}"
        shutil.copytree(trained_checkpoint, candidate)
        run = await loop.promote_or_reject(
            run,
            candidate,
            sha256=verify_checkpoint(candidate),
            candidate_success=candidate_success,
            active_success=active_success,
        )
        if number == 1:
            assert run.status == RunStatus.REJECTED
            assert (await improve_store.get_policy_version(run.candidate_version_id)).status == PolicyStatus.REJECTED
            assert holder.active is base and await improve_store.active_policy_version() is None
        else:
            assert run.status == RunStatus.SUCCEEDED
            assert holder.version_id == run.candidate_version_id
            assert (await improve_store.active_policy_version()).id == run.candidate_version_id
            # keep_versions=1: the rejected first candidate's checkpoint is pruned, the active one kept.
            versions = {v.status: Path(v.path) for v in await improve_store.list_policy_versions()}
            assert not versions[PolicyStatus.REJECTED].exists() and versions[PolicyStatus.ACTIVE].is_dir()
    # Rolling back goes to the base model (nothing was active before), and the rolled-back version stays out.
    assert "base model" in await loop.rollback(requested_by="test")
    assert holder.version_id is None and await improve_store.active_policy_version() is None
    assert "Nothing to roll back" in await loop.rollback(requested_by="test")
    assert holder.version_id is None and await improve_store.active_policy_version() is None
    holder.close()


async def test_swap_while_sixteen_chats_are_in_flight(
    improve_store: Store, tmp_path: Path, trained_checkpoint: Path
) -> None:
    from learning.checkpoint import verify_checkpoint

    settings = improve_settings(tmp_path)
    holder = PolicyHolder(tiny_loader("base", None))
    service = DialogueService(store=improve_store, policies=holder, task=TASK, settings=settings)
    loop = ImprovementLoop(store=improve_store, settings=settings, task=TASK, holder=holder, load_policy=tiny_loader)
    version = await improve_store.register_policy_version(
        path=str(trained_checkpoint),
        sha256=verify_checkpoint(trained_checkpoint),
        base_model="tiny",
        algorithm="bc",
    )
    await improve_store.activate_policy_version(version.id)  # as `reverie policies activate` would
    chats = [ChatRef(platform="telegram", chat_id=str(i), user_id=str(i)) for i in range(16)]
    old = holder.active
    swapped = asyncio.Event()

    async def chat(ref: ChatRef) -> list[str]:
        # Keep talking until the swap has happened and two more turns were served, so turns are in flight
        # across the swap however long loading the new version takes.
        texts: list[str] = []
        after = 0
        while after < 2:
            after += swapped.is_set()
            texts += [reply.text for reply in await service.handle_message(ref, f"turn {len(texts)}")]
        return texts

    conversations = asyncio.gather(*(chat(ref) for ref in chats))
    while holder.leases(old) < 8:
        await asyncio.sleep(0.01)
    assert await loop.sync_active()
    in_flight_at_swap = holder.leases(old)  # turns that started on the old policy and have not ended yet
    swapped.set()
    replies = await conversations
    assert in_flight_at_swap > 0
    assert all(texts and all(t.strip() for t in texts) for texts in replies)
    served: list[int | None] = []
    for ref in chats:
        turns = await _turns_of(improve_store, ref)
        assert [t.role for t in turns] == ["agent"] + ["user", "agent"] * ((len(turns) - 1) // 2)
        exchanges = [(turns[i], turns[i + 1]) for i in range(1, len(turns), 2)]
        # A turn is served by the policy it started with: the user's and the agent's turn agree.
        assert all(user.policy_version_id == agent.policy_version_id for user, agent in exchanges)
        versions = [agent.policy_version_id for _, agent in exchanges]
        # Once a chat got the new version it never gets the old one again, and each chat ends on the new one.
        assert versions == sorted(versions, key=lambda v: v is not None) and versions[-1] == version.id
        served += versions
    assert set(served) == {None, version.id}
    # Later turns are all served by the new version.
    after = await service.handle_message(chats[0], "see you")
    assert after and (await _turns_of(improve_store, chats[0]))[-1].policy_version_id == version.id
    await service.shutdown()
    holder.close()


async def test_rated_telegram_conversation_trains_a_policy_that_serves_the_next_reply(tmp_path: Path) -> None:
    """Issue acceptance, without restarting the bot: a Telegram conversation is logged and rated; an admin's
    /retrain imagines fresh dialogues, trains on them plus that real dialogue, evaluates, promotes and hot-swaps;
    the next reply is served by the new version. Meanwhile another process holds the database's write lock for
    a while, so the run's own writes must wait and retry."""
    from bot.adapters.telegram import run_telegram
    from bot.improve import make_improvement_hook
    from bot.server import open_runtime
    from tests.fakes.telegram_api import FakeTelegramServer

    admin, alice = 4242, 1001
    released = threading.Event()

    def hold_write_lock(seconds: float) -> None:
        connection = sqlite3.connect(tmp_path / "reverie.db", timeout=30)
        connection.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        connection.commit()
        connection.close()
        released.set()

    async with FakeTelegramServer() as server:
        settings = improve_settings(
            tmp_path,
            improve_imagined=16,
            telegram_token=server.token,
            telegram_base_url=server.base_url,
            admin_ids=[f"telegram:{admin}"],
        )
        async with open_runtime(settings, improver_hook=make_improvement_hook(sync_interval_s=3600)) as runtime:
            loop = runtime.service.improver
            assert isinstance(loop, ImprovementLoop)

            def on_step(step: str) -> None:
                if step == "gate":
                    threading.Thread(target=hold_write_lock, args=(1.5,), daemon=True).start()
                    time.sleep(0.2)

            loop.on_step = on_step
            stop = asyncio.Event()
            polling = asyncio.create_task(run_telegram(runtime.service, settings, stop))
            try:
                await server.wait_for_call("getUpdates", timeout=60)
                await server.send_command(alice, alice, "start")
                await server.next_message(alice)
                await server.send_text(alice, alice, "I love food")
                await server.next_message(alice)
                await server.send_command(alice, alice, "end", "good")
                await server.next_message(alice)
                store = runtime.store
                [real] = await store.dialogues_for_training(sources=["real"])
                assert real.reward == 1.0 and [t.role for t in real.turns] == ["agent", "user", "agent"]

                await server.send_command(alice, alice, "retrain")
                assert "admin" in (await server.next_message(alice))["text"].lower()  # refused: not an admin
                await server.send_command(admin, admin, "retrain")
                assert "started" in (await server.next_message(admin))["text"]
                run = await asyncio.wait_for(loop.wait(), 900)
                assert run is not None and run.status == RunStatus.SUCCEEDED, run and run.error
                assert released.is_set()
                assert (run.n_imagined, run.n_real) == (16, 1)
                assert runtime.policies.version_id == run.candidate_version_id

                await server.send_text(alice, alice, "Hello again")
                await server.next_message(alice)
                turns = await _turns_of_latest(store, f"telegram:{alice}")
                assert turns[-1].role == "agent" and turns[-1].policy_version_id == run.candidate_version_id

                await server.send_command(admin, admin, "status")
                status = (await server.next_message(admin))["text"]
                assert f"version {run.candidate_version_id}" in status and f"#{run.id}" in status
            finally:
                stop.set()
                await asyncio.wait_for(polling, 60)


async def test_first_start_trains_in_the_background_while_the_base_model_serves(tmp_path: Path) -> None:
    from bot.improve import make_improvement_hook
    from bot.server import open_runtime

    settings = improve_settings(tmp_path, improve_on_first_start=True, improve_imagined=8, improve_steps=100_000)
    async with open_runtime(settings, improver_hook=make_improvement_hook()) as runtime:
        loop = runtime.service.improver
        assert isinstance(loop, ImprovementLoop) and loop.running
        assert runtime.policies.version_id is None  # the prompted base model answers at once
        replies = await runtime.service.handle_message(ChatRef("console", "c", "u"), "hello")
        assert replies and replies[-1].text.strip()
        run = await runtime.store.last_training_run()
        assert run.trigger == "first-start" and run.status == RunStatus.RUNNING
        assert any("in progress" in line for line in await loop.status_lines())
    # Leaving the runtime cancels the run: nothing keeps training after the server stops.
    assert (await _reopen_last_run(settings)).status == RunStatus.CANCELLED


async def _reopen_last_run(settings: Settings):
    database = Database(settings.resolved_database_url)
    try:
        return await Store(database).last_training_run()
    finally:
        await database.dispose()


async def _turns_of_latest(store: Store, user_key: str) -> list:
    from sqlmodel import col, select

    from storage import Conversation

    async with store.database.session() as session:
        query = select(Conversation).where(Conversation.user_key == user_key).order_by(col(Conversation.id).desc())
        conversation = (await session.exec(query)).first()
    return await store.get_turns(conversation.id)


async def _register_versions(store: Store, tmp_path: Path, count: int) -> list[int]:
    """``count`` versions with checkpoint directories, each promoted in turn (as improvement runs would)."""
    ids = []
    for number in range(1, count + 1):
        path = tmp_path / "policies" / f"v{number}"
        path.mkdir(parents=True)
        version = await store.register_policy_version(
            path=str(path), sha256=f"{number:064d}", base_model="tiny", algorithm="bc"
        )
        await store.activate_policy_version(version.id)
        ids.append(version.id)
    return ids


async def test_rollback_is_a_stack_that_survives_a_restart(store: Store, tmp_path: Path) -> None:
    settings = improve_settings(tmp_path)
    v1, v2, v3 = await _register_versions(store, tmp_path, 3)

    async def rollback_in_a_fresh_process() -> str:
        # A new engine, store and loop each time: nothing but the database carries the stack.
        database = Database(store.database.url)
        try:
            fresh = Store(database)
            return await ImprovementLoop(store=fresh, settings=settings, task=TASK).rollback(requested_by="test")
        finally:
            await database.dispose()

    async def active() -> int | None:
        version = await store.active_policy_version()
        return version.id if version else None

    assert f"from version {v3} to version {v2}" in await rollback_in_a_fresh_process()
    assert await active() == v2
    assert f"from version {v2} to version {v1}" in await rollback_in_a_fresh_process()
    assert f"from version {v1} to the prompted base model" in await rollback_in_a_fresh_process()
    assert await active() is None
    for _ in range(2):  # not a toggle: nothing brings a rolled-back version back
        assert "Nothing to roll back" in await rollback_in_a_fresh_process()
        assert await active() is None
    assert {v.status for v in await store.list_policy_versions()} == {PolicyStatus.ROLLED_BACK}

    # A new promotion on top of the base model: rolling it back serves the base model, not an old version.
    (v4,) = await _register_versions(store, tmp_path / "later", 1)
    assert "to the prompted base model" in await rollback_in_a_fresh_process()
    assert await active() is None and "Nothing to roll back" in await rollback_in_a_fresh_process()

    # Re-activating by hand puts a version back on the stack; served v1, v4, v1: rollback → v4 → base.
    await store.activate_policy_version(v4)
    await store.activate_policy_version(v1)
    assert f"from version {v1} to version {v4}" in await rollback_in_a_fresh_process()
    assert f"from version {v4} to the prompted base model" in await rollback_in_a_fresh_process()
    assert "Nothing to roll back" in await rollback_in_a_fresh_process()


async def test_rollback_skips_deleted_checkpoints_and_concurrent_rollbacks_step_once(
    store: Store, tmp_path: Path
) -> None:
    import shutil

    settings = improve_settings(tmp_path)
    v1, v2, v3, v4 = await _register_versions(store, tmp_path, 4)
    shutil.rmtree(tmp_path / "policies" / "v3")  # pruned, or removed by hand
    loop = ImprovementLoop(store=store, settings=settings, task=TASK)
    message = await loop.rollback(requested_by="test")
    assert f"from version {v4} to version {v2}" in message and f"skipped version {v3}" in message
    # Two admins who both saw v2 active: the first rollback applies; the second, acting on a stale view, changes
    # nothing instead of stepping back a second time; a retry of the first (lost acknowledgement) is a no-op.
    assert (await store.roll_back(v2, v1)).id == v1
    with pytest.raises(PolicyChangedError):
        await store.roll_back(v2, None)
    assert (await store.roll_back(v2, v1)).id == v1
    assert (await store.active_policy_version()).id == v1
    assert (await store.get_policy_version(v3)).status == PolicyStatus.ROLLED_BACK


def test_cli_rollback_three_times_does_not_toggle(tmp_path: Path) -> None:
    """The issue's reproduction: three `reverie policies rollback` in a row, each its own process."""
    import subprocess
    import sys

    async def seed() -> int:
        database = Database(f"sqlite:///{tmp_path / 'reverie.db'}")
        await database.create_schema()
        try:
            [v1] = await _register_versions(Store(database), tmp_path, 1)
            return v1
        finally:
            await database.dispose()

    v1 = asyncio.run(seed())
    env = {**os.environ, "DATA_DIR": str(tmp_path), "DATABASE_URL": "", "LOG_LEVEL": "WARNING"}
    outputs = [
        subprocess.run(
            [sys.executable, "-m", "bot.cli", "policies", "rollback"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        for _ in range(3)
    ]
    said = [" ".join((result.stdout + result.stderr).split()) for result in outputs]
    assert f"Rolled back from version {v1} to the prompted base model" in said[0]
    assert all("Nothing to roll back" in output for output in said[1:]), said


async def test_a_task_given_by_path_runs_a_whole_improvement_run(tmp_path: Path) -> None:
    """A task of one's own, given as a TOML path outside the repository (not a built-in): the loop's children get
    the file, imagine from its compiled world, train, evaluate on the world's held-out users and promote."""
    import shutil

    from bot.improve import make_improvement_hook
    from bot.server import open_runtime

    source = Path(__file__).resolve().parents[1] / "examples" / "houseplants.toml"
    path = tmp_path / "tasks" / "plantshop.toml"
    path.parent.mkdir()
    shutil.copyfile(source, path)
    path.write_text(path.read_text(encoding="utf-8").replace('name = "houseplants"', 'name = "plantshop"', 1))
    settings = improve_settings(tmp_path / "data", task=str(path), imagine_backend="auto", improve_imagined=16)
    async with open_runtime(settings, improver_hook=make_improvement_hook(sync_interval_s=3600)) as runtime:
        loop = runtime.service.improver
        assert isinstance(loop, ImprovementLoop) and runtime.task.name == "plantshop"
        assert loop.imagination().backend == "scripted"  # its world, offline
        run = await loop.run_once(trigger="test")
        assert run.status == RunStatus.SUCCEEDED, run.error
        assert (run.n_imagined, run.n_real) == (16, 0)
        assert runtime.policies.version_id == run.candidate_version_id
        assert all(run.metrics[f"{step}_s"] >= 0 for step in ("imagine", "select", "train", "evaluate"))
        imagined = await runtime.store.dialogues_for_training(sources=["imagined"], task="plantshop")
        assert len(imagined) == 16 and all(d.persona and "light" in d.persona for d in imagined)
        version = await runtime.store.get_policy_version(run.candidate_version_id)
        assert version is not None and "success_rate" in version.metrics  # gated on the world's held-out users
        replies = await runtime.service.handle_message(ChatRef("console", "c", "u"), "I have a cat")
        assert replies[-1].turn_id is not None and replies[-1].text.strip()
