"""The fault suite: faults that must not lose, duplicate or leak anything.

Everything is real: python-telegram-bot against the fake Bot API, the tiny policy, SQLite and a real PostgreSQL
server, improvement steps as child processes, ``reverie serve`` as a process of its own. Each test counts the
faults it injects and asserts the outcome that matters to users: every turn logged exactly once and in order,
every message answered (an apology counts as a failure where none is excusable), nothing of a forgotten user
left anywhere, no secret in any output. ``FAULTS`` collects the counts; the last test prints the tally.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlmodel import col, select

from bot.adapters.telegram import APOLOGY, run_telegram
from bot.events import ChatRef, decode_feedback
from bot.improve import ImprovementLoop
from bot.policy_holder import PolicyHolder
from bot.service import POLICY_APOLOGY, STORAGE_APOLOGY, DialogueService
from bot.settings import Settings
from imagine.simulated.behaviour import generate_and_save, generate_scripted_dialogues
from imagine.task import load_task
from learning.interface import Policy
from learning.policy import load_policy
from storage import Conversation, Database, RunStatus, Store, Turn
from tests.fakes.tcp_proxy import TcpProxy
from tests.fakes.telegram_api import FakeTelegramServer

TASK = load_task("travel")
APOLOGIES = {APOLOGY, POLICY_APOLOGY, STORAGE_APOLOGY}
#: Faults injected and outcomes, per test: summed up by ``test_zz_tally`` (and kept for the issue's note).
FAULTS: Counter[str] = Counter()


def tiny_loader(source: str, version_id: int | None) -> Policy:
    return load_policy(source, task=TASK, base_model="tiny", version_id=version_id, max_new_tokens=8)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # A 64-wide model gains nothing from more threads; spinning threads crawl on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, few-step) BC checkpoint: the version hot-swapped in under load."""
    from learning.training import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "bc"
    config = TrainConfig(algorithm="bc", task="travel", base_model="tiny", steps=3, batch_size=4)
    return train(config, generate_scripted_dialogues("travel", 16, seed=1), out_dir=out, progress=False)


def fault_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "base_model": "tiny",
        "imagine_backend": "scripted",
        "improve_imagined": 0,
        "improve_steps": 100_000,  # the trainer runs until it is killed
        "improve_eval_episodes": 2,
        "improve_margin": 1.0,
        "improve_on_first_start": False,
        "max_new_tokens": 8,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def _processes_with(*fragments: str) -> list[int]:
    """PIDs of Reverie processes whose command line contains every fragment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "bot.cli" in cmdline and all(fragment in cmdline for fragment in fragments):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def _wait_for(predicate, what: str, timeout: float = 120.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


async def _turns_by_user(store: Store) -> dict[str, list[Turn]]:
    """Every stored turn of every real conversation, grouped by user, in conversation and turn order."""
    async with store.database.session() as session:
        conversations = (
            await session.exec(select(Conversation).where(Conversation.source == "real").order_by(col(Conversation.id)))
        ).all()
    turns: dict[str, list[Turn]] = {}
    for conversation in conversations:
        turns.setdefault(conversation.user_key, []).extend(await store.get_turns(conversation.id))
    return turns


# --- 32 chats × 3 messages through Telegram, while the policy is swapped and a trainer is killed -----------------


async def test_telegram_load_survives_a_hot_swap_a_killed_trainer_and_api_faults(
    sqlite_store: Store, tmp_path: Path, trained_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from learning.checkpoint import verify_checkpoint

    caplog.set_level(logging.INFO)
    store = sqlite_store
    await generate_and_save(store, "travel", 24, seed=0)  # something for the trainer to train on
    chats, messages = 32, 3
    async with FakeTelegramServer() as server:
        settings = fault_settings(tmp_path, telegram_token=server.token, telegram_base_url=server.base_url)
        holder = PolicyHolder(tiny_loader("base", None))
        service = DialogueService(store=store, policies=holder, task=TASK, settings=settings)
        loop = ImprovementLoop(store=store, settings=settings, task=TASK, holder=holder, load_policy=tiny_loader)
        stop = asyncio.Event()
        polling = asyncio.create_task(run_telegram(service, settings, stop, poll_timeout_s=5))
        try:
            await server.wait_for_call("getUpdates", timeout=60)
            # A trainer child that will be SIGKILLed in the middle of the load.
            assert "started" in await loop.request_run(trigger="admin", requested_by="test")
            trainer = await _wait_for(lambda: next(iter(_processes_with(str(tmp_path), " train ")), None), "trainer")
            # Telegram misbehaving: flood control on replies, a failing poll.
            server.fail_next("sendMessage", error_code=429, description="Too Many Requests: retry after 1",
                             retry_after=1, times=2)  # fmt: skip
            server.fail_next("getUpdates", error_code=502, description="Bad Gateway")
            FAULTS.update({"telegram 429 on sendMessage": 2, "telegram 502 on getUpdates": 1})

            version = await store.register_policy_version(
                path=str(trained_checkpoint),
                sha256=verify_checkpoint(trained_checkpoint),
                base_model="tiny",
                algorithm="bc",
            )
            old_policy = holder.active
            done = 0
            received: dict[int, list[tuple[str, dict]]] = {}

            async def user(chat_id: int) -> None:
                nonlocal done
                log = received.setdefault(chat_id, [])
                for number in range(messages):
                    words = f"chat {chat_id} message {number}: somewhere warm"
                    await server.send_text(chat_id, chat_id, words)
                    for _ in range(2 if number == 0 else 1):  # the opening line comes first
                        log.append((words, await server.next_message(chat_id, timeout=120)))
                    done += 1

            load = asyncio.gather(*(user(10_000 + i) for i in range(chats)))
            await _wait_for(lambda: done >= chats // 2, "a third of the load")
            await store.activate_policy_version(version.id)  # as `reverie policies activate` would
            assert await loop.sync_active()
            in_flight_at_swap = holder.leases(old_policy)
            FAULTS["policy hot swaps"] += 1
            await _wait_for(lambda: done >= chats, "half the load")
            os.kill(trainer, signal.SIGKILL)
            FAULTS["trainer SIGKILLs"] += 1
            await asyncio.wait_for(load, 300)
            run = await asyncio.wait_for(loop.wait(), 60)
        finally:
            stop.set()
            await asyncio.wait_for(polling, 60)
            await service.shutdown()
            holder.close()

    assert in_flight_at_swap > 0, "the swap must land while turns are in flight"
    assert run is not None and run.status == RunStatus.FAILED and "exit -9" in (run.error or "")
    assert not _alive(trainer) and _processes_with(str(tmp_path)) == []

    stored = await _turns_by_user(store)
    assert sorted(stored) == sorted(f"telegram:{10_000 + i}" for i in range(chats))
    lost = duplicated = apologies = 0
    served: Counter[int | None] = Counter()
    for chat_id, log in received.items():
        turns = stored[f"telegram:{chat_id}"]
        sent = [f"chat {chat_id} message {n}: somewhere warm" for n in range(messages)]
        user_turns = [t.text for t in turns if t.role == "user"]
        lost += sum(1 for words in sent if words not in user_turns)
        duplicated += len(user_turns) - len(set(user_turns))
        # In order: the opening line, then user and agent turns alternating, at consecutive positions.
        assert [t.role for t in turns] == ["agent"] + ["user", "agent"] * messages, chat_id
        assert [t.index for t in turns] == list(range(len(turns)))
        assert user_turns == sent
        by_id = {t.id: t for t in turns}
        for words, message in log:
            if message["text"] in APOLOGIES:
                apologies += 1
                continue
            turn_id = decode_feedback(message["reply_markup"]["inline_keyboard"][0][0]["callback_data"])[0]
            agent = by_id[turn_id]
            assert agent.role == "agent" and agent.text == message["text"]
            if agent.index > 0:  # not the opening line: it answers exactly the message it was sent for
                question = turns[agent.index - 1]
                assert question.text == words and question.policy_version_id == agent.policy_version_id
                served[agent.policy_version_id] += 1
    FAULTS["telegram turns lost"] += lost
    FAULTS["telegram turns duplicated"] += duplicated
    FAULTS["telegram apologies"] += apologies
    assert (lost, duplicated, apologies) == (0, 0, 0)
    assert set(served) == {None, version.id} and sum(served.values()) == chats * messages
    assert server.token not in caplog.text and server.token.split(":")[1] not in caplog.text


# --- PostgreSQL connections dropped before, during and after writes ---------------------------------------------


def _terminate(admin_url: str, database: str, *, waiting_on_lock: bool = False) -> list[str]:
    """``pg_terminate_backend`` every other session of ``database``; returns the states they were in."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT pid, state, wait_event_type FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            ).all()
            killed = []
            for pid, state, wait in rows:
                if waiting_on_lock and wait != "Lock":
                    continue
                if connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar():
                    killed.append(f"{state}{'/lock' if wait == 'Lock' else ''}")
            return killed
    finally:
        engine.dispose()


@pytest.mark.postgres
async def test_postgres_backends_terminated_and_commit_acks_lost_under_load(postgres_url: str) -> None:
    from tests.conftest import _truncate_postgres

    await asyncio.to_thread(_truncate_postgres, postgres_url)
    url = make_url(postgres_url)
    admin_url = url.render_as_string(hide_password=False)
    chats, messages = 8, 3
    policy = tiny_loader("base", None)
    async with TcpProxy(url.port or 5432) as proxy:
        database = Database(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
        store = Store(database)
        service = DialogueService(
            store=store, policies=PolicyHolder(policy), task=TASK, settings=fault_settings(Path("/nonexistent"))
        )
        killed: list[str] = []
        stop = asyncio.Event()

        async def terminator() -> None:
            # Every other session of the bot's database, every 150 ms: idle pooled connections (the next write
            # finds them dead), sessions inside a transaction, sessions running a statement.
            while not stop.is_set():
                killed.extend(await asyncio.to_thread(_terminate, admin_url, url.database or ""))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.15)

        replies: dict[int, list[tuple[str, list[str]]]] = {}

        async def user(number: int) -> None:
            chat = ChatRef("telegram", str(number), str(number))
            for index in range(messages):
                words = f"user {number} says {index}"
                proxy.lose_commit_acks()  # one commit of each exchange is applied but never acknowledged
                answer = await service.handle_message(chat, words)
                replies.setdefault(number, []).append((words, [r.text for r in answer]))

        # First, deterministically, a write blocked inside its transaction is terminated while it waits.
        chat = ChatRef("telegram", "900", "900")
        await service.handle_message(chat, "first words")
        conversation_id = (await _turns_by_user(store))["telegram:900"][0].conversation_id
        blocker = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://", 1))
        with blocker.connect() as connection:
            connection.execute(text("SELECT id FROM conversation WHERE id = :id FOR UPDATE"), {"id": conversation_id})
            pending = asyncio.create_task(service.handle_message(chat, "second words"))
            await _wait_for(
                lambda: asyncio.to_thread(_terminate, admin_url, url.database or "", waiting_on_lock=True),
                "a write waiting on the row lock",
                timeout=30,
                interval=0.05,
            )
            connection.rollback()
        blocked_answer = await pending
        FAULTS["postgres backends terminated inside a write (deterministic)"] += 1

        watcher = asyncio.create_task(terminator())
        try:
            await asyncio.gather(*(user(n) for n in range(chats)))
        finally:
            stop.set()
            await watcher
        stored = await _turns_by_user(store)
        await database.dispose()
    policy.close()

    states = Counter(killed)
    FAULTS["postgres backends terminated (random)"] += len(killed)
    FAULTS["postgres backends terminated mid-transaction or mid-statement (random)"] += sum(
        n for state, n in states.items() if state != "idle"
    )
    FAULTS["postgres commit acknowledgements lost"] += proxy.lost_acks
    assert killed and proxy.lost_acks >= chats  # the faults really happened

    assert [t.text for t in stored["telegram:900"] if t.role == "user"] == ["first words", "second words"]
    assert blocked_answer[-1].text not in APOLOGIES
    lost = duplicated = apologies = 0
    for number, exchanges in replies.items():
        turns = stored[f"telegram:{number}"]
        user_turns = [t.text for t in turns if t.role == "user"]
        duplicated += len(user_turns) - len(set(user_turns)) + len(turns) - len({t.index for t in turns})
        assert [t.index for t in turns] == list(range(len(turns)))
        for words, texts in exchanges:
            if texts[-1] in APOLOGIES:  # a clear apology: the user knows to send it again
                apologies += 1
                continue
            lost += words not in user_turns
            position = user_turns.index(words)
            agent = [t for t in turns if t.role == "agent"][position + 1]
            assert agent.text == texts[-1]
    FAULTS["postgres turns lost"] += lost
    FAULTS["postgres turns duplicated"] += duplicated
    FAULTS["postgres apologies"] += apologies
    assert (lost, duplicated) == (0, 0)
    # Retries absorb every one of these faults: no user even needed the apology.
    assert apologies == 0


# --- `reverie serve` SIGKILLed during an improvement run; secrets nowhere ----------------------------------------

ADMIN = 4242
SECRET_KEY = "sk-test-OPENAI-KEY-do-not-log-7f3a9c"
DB_PASSWORD = "db-Pass-do-not-log-51e8"


async def _last_run(url: str):  # type: ignore[no-untyped-def]
    database = Database(url)
    try:
        return await Store(database).last_training_run()
    finally:
        await database.dispose()


@pytest.mark.postgres
async def test_serve_killed_during_a_run_recovers_and_no_secret_leaks(postgres_url: str, tmp_path: Path) -> None:
    import sys

    from storage.locks import TrainerLock
    from tests.conftest import _truncate_postgres

    await asyncio.to_thread(_truncate_postgres, postgres_url)
    # Trust authentication accepts any password: the URL carries one, as a production URL would.
    url = make_url(postgres_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    database = Database(url)
    await generate_and_save(Store(database), "travel", 24, seed=0)
    await database.dispose()
    outputs: list[bytes] = []

    async with FakeTelegramServer() as server:
        env = {
            **os.environ,
            "DATA_DIR": str(tmp_path),
            "DATABASE_URL": url,
            "TELEGRAM_TOKEN": server.token,
            "TELEGRAM_BASE_URL": server.base_url,
            "OPENAI_API_KEY": SECRET_KEY,
            "ADMIN_IDS": f"telegram:{ADMIN}",
            "BASE_MODEL": "tiny",
            "IMAGINE_BACKEND": "scripted",
            "IMPROVE_IMAGINED": "0",
            "IMPROVE_STEPS": "100000",
            "IMPROVE_EVAL_EPISODES": "2",
            "IMPROVE_MARGIN": "1.0",
            "IMPROVE_ON_FIRST_START": "false",
            "MAX_NEW_TOKENS": "8",
            "TORCH_THREADS": "1",
            "LOG_LEVEL": "DEBUG",  # the most verbose logs are the likeliest to leak
        }

        async def start(environment: dict[str, str]) -> asyncio.subprocess.Process:
            getme = len(server.calls_to("getMe"))
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot.cli", "serve", env=environment,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            )  # fmt: skip
            await _wait_for(lambda: len(server.calls_to("getMe")) > getme or process.returncode is not None, "serve")
            assert process.returncode is None
            return process

        async def ask(command: str) -> str:
            await server.send_command(ADMIN, ADMIN, command)
            return str((await server.next_message(ADMIN, timeout=120))["text"])

        first = await start(env)
        try:
            assert "started" in await ask("retrain")
            trainer = await _wait_for(lambda: next(iter(_processes_with(str(tmp_path), " train ")), None), "trainer")
            first.kill()  # SIGKILL: no clean-up of any kind runs in the server
            FAULTS["reverie serve SIGKILLs"] += 1
        finally:
            outputs.append((await first.communicate())[0])
        # The trainer dies with its parent (PR_SET_PDEATHSIG); the run is left 'running' in the database.
        await _wait_for(lambda: not _alive(trainer), "the orphaned trainer to die", timeout=30)
        assert (await _last_run(url)).status == RunStatus.RUNNING

        second = await start({**env, "IMPROVE_STEPS": "2", "IMPROVE_VALUE_STEPS": "2"})
        try:
            stale = await _wait_for(
                lambda: _last_run(url), "the stale run to be marked failed", timeout=60
            )  # the first start-up step is recovery
            await _wait_for(
                lambda: _run_status_is(url, stale.id, RunStatus.FAILED), "recovery of the stale run", timeout=60
            )
            lock = TrainerLock(Database(url))
            assert await lock.acquire(), "the killed server's trainer lock must be free"
            await lock.release()
            await lock.database.dispose()
            assert "started" in await ask("retrain")
            run = await _wait_for(lambda: _finished_run_after(url, stale.id), "the new run", timeout=300, interval=0.5)
            status = await ask("status")
        finally:
            second.send_signal(signal.SIGTERM)
            outputs.append((await asyncio.wait_for(second.communicate(), 60))[0])
        sent = [str(message["text"]) for message in server.sent_messages]

    assert second.returncode == 0
    stale = await _run_by_id(url, stale.id)
    assert stale.status == RunStatus.FAILED and "stopped before it finished" in (stale.error or "")
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert f"#{run.id}" in status and f"version {run.candidate_version_id}" in status
    assert _processes_with(str(tmp_path)) == []

    # Secrets: in no output line, file, run record or reply (the password also not in its URL-encoded form).
    secrets = [server.token, server.token.split(":")[1], SECRET_KEY, DB_PASSWORD]
    texts = {"serve output": b"\n".join(outputs).decode(errors="replace"), "replies": "\n".join(sent)}
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode(errors="replace")
    database = Database(url)
    async with database.session() as session:
        from storage import TrainingRun

        runs = (await session.exec(select(TrainingRun))).all()
    await database.dispose()
    texts["run records"] = json.dumps([r.model_dump(mode="json") for r in runs])
    assert "DEBUG" in texts["serve output"] and "Telegram adapter polling" in texts["serve output"]
    leaks = [(where, secret[:6]) for where, body in texts.items() for secret in secrets if secret in body]
    FAULTS["secrets leaked"] += len(leaks)
    assert leaks == []


async def _run_status_is(url: str, run_id: int, status: str) -> bool:
    return (await _run_by_id(url, run_id)).status == status


async def _run_by_id(url: str, run_id: int):  # type: ignore[no-untyped-def]
    from storage import TrainingRun

    database = Database(url)
    try:
        async with database.session() as session:
            return await session.get(TrainingRun, run_id)
    finally:
        await database.dispose()


async def _finished_run_after(url: str, run_id: int):  # type: ignore[no-untyped-def]
    run = await _last_run(url)
    return run if run is not None and run.id != run_id and run.status != RunStatus.RUNNING else None


# --- /forget reaches every copy, and a run in progress cannot publish the forgotten user ---------------------


async def test_forget_reaches_run_inputs_exports_database_files_and_the_run_in_progress(
    tmp_path: Path, trained_checkpoint: Path
) -> None:
    import shutil
    import subprocess
    import sys

    from learning.checkpoint import verify_checkpoint

    settings = fault_settings(tmp_path, admin_ids=["telegram:1"])
    database = Database(settings.resolved_database_url)
    await database.create_schema()
    store = Store(database)
    holder = PolicyHolder(tiny_loader("base", None))
    service = DialogueService(store=store, policies=holder, task=TASK, settings=settings)
    loop = ImprovementLoop(store=store, settings=settings, task=TASK, holder=holder, load_policy=tiny_loader)
    marker = "Kerguelen-9XQ-private-wish"
    alice, bob = ChatRef("telegram", "7", "7"), ChatRef("telegram", "8", "8")
    await service.handle_message(alice, f"I secretly want to go to {marker}")
    await service.handle_command(alice, "end", "good")
    await service.handle_message(bob, "Paris, please")
    await service.handle_command(bob, "end", "good")
    export = tmp_path / "exports" / "all.jsonl"
    env = {**os.environ, "DATA_DIR": str(tmp_path), "DATABASE_URL": "", "LOG_LEVEL": "WARNING"}
    subprocess.run([sys.executable, "-m", "bot.cli", "dialogues", "export", "--out", str(export)], env=env, check=True)
    assert marker in export.read_text()

    # A run selected both users and is training (its input file is on disk) when alice asks to be forgotten.
    run = await store.start_training_run(trigger="test")
    run_dir = tmp_path / "runs" / f"run-{run.id}"
    _, run, real_ids = await loop._select(run, run_dir)
    assert marker in (run_dir / "dialogues.jsonl").read_text() and len(real_ids) == 2
    assert "deleted 1 conversation" in (await service.handle_command(alice, "forget"))[0].text
    candidate = tmp_path / "candidate"
    shutil.copytree(trained_checkpoint, candidate)
    finished = await loop.promote_or_reject(
        run, candidate, sha256=verify_checkpoint(candidate), candidate_success=1.0, active_success=0.0,
        trained_on=real_ids,
    )  # fmt: skip
    assert finished.status == RunStatus.FAILED and "forgotten" in (finished.error or "")
    assert holder.version_id is None and await store.active_policy_version() is None
    assert list(settings.checkpoints_dir.glob("*")) == []  # the candidate is gone, never served

    remaining = [str(p) for p in tmp_path.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    FAULTS["forgotten rows or files remaining"] += len(remaining) + await store.count_conversations(source="real") - 1
    assert remaining == []
    assert "Paris, please" in export.read_text() and "Paris, please" in (run_dir / "dialogues.jsonl").read_text()
    await service.shutdown()
    holder.close()
    await database.dispose()


def test_zz_tally() -> None:
    """The faults injected by this module and what they cost (printed with ``-s``; all losses must be 0)."""
    print("\nfault suite tally:", json.dumps(dict(sorted(FAULTS.items())), indent=1))
    losses = ("turns lost", "turns duplicated", "secrets leaked", "forgotten rows or files remaining")
    assert all(FAULTS[key] == 0 for key in FAULTS if any(loss in key for loss in losses))
