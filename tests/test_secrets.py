"""Secrets stay out of log lines, tracebacks, run records and command replies, with a real traceback in the path.

The OpenAI key: the real ``openai`` client gets a 401 whose body quotes the key (as OpenAI's does), so the key sits
in the exception chain; that failure goes through a real improvement run (``ImprovementLoop.run_once``: run record
and log line), the project's log handler (``RichHandler`` with rich tracebacks, as ``configure_logging`` sets up),
Python's last-resort hook, and ``/status``. The database password: a real child step (``bot.improve._step``) fails to
connect with a password-carrying ``DATABASE_URL`` and prints a traceback quoting the URL and the bare password; its
log file, the run record and ``/status`` must show the failure but not the password.
"""

from __future__ import annotations

import io
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from rich.logging import RichHandler

from bot.events import ChatRef
from bot.improve import ImprovementLoop, _step
from bot.policy_holder import PolicyHolder
from bot.redaction import MASK
from bot.service import DialogueService
from bot.settings import Settings
from imagine.backends import BackendError, make_backend
from imagine.task import load_task
from storage import RunStatus, Store
from storage.database import Database
from tests.fakes.openai_server import FakeOpenAIServer
from tests.test_service import ScriptedPolicy

TASK = load_task("travel")
ADMIN = ChatRef(platform="discord", chat_id="300", user_id="99", user_name="root")
HELLO = [{"role": "user", "content": "hello"}]
SECRET_KEY = "sk-proj-SECRET-openai-key-never-log-9c1e77"
DB_PASSWORD = "pgSECRETpass-never-log-3b8d"


@pytest.fixture
def project_log() -> Iterator[io.StringIO]:
    """Everything logged, rendered by the handler ``configure_logging`` installs (rich tracebacks included)."""
    stream = io.StringIO()
    handler = RichHandler(
        console=Console(file=stream, width=400, color_system=None), rich_tracebacks=True, show_path=False
    )
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=tmp_path,
        base_model="tiny",
        admin_ids=["discord:99"],
        improve_on_first_start=False,
        log_level="WARNING",
        **values,
    )


async def _sqlite_store(tmp_path: Path) -> Store:
    database = Database(f"sqlite:///{tmp_path / 'reverie.db'}")
    await database.create_schema()
    return Store(database)


async def _status_reply(store: Store, settings: Settings) -> str:
    service = DialogueService(store=store, policies=PolicyHolder(ScriptedPolicy()), task=TASK, settings=settings)
    return "\n".join(reply.text for reply in await service.handle_command(ADMIN, "status"))


async def test_openai_key_in_a_401_traceback_reaches_no_log_record_or_reply(
    tmp_path: Path, project_log: io.StringIO, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, imagine_backend="openai", openai_api_key=SECRET_KEY)
    store = await _sqlite_store(tmp_path)
    raised: list[BaseException] = []
    async with FakeOpenAIServer() as server:
        loop = ImprovementLoop(store=store, settings=settings, task=TASK)  # registers the settings' secrets

        async def imagine_with_openai(*_: object) -> None:
            chat = make_backend(
                "openai", base_url=server.base_url, model="fake-model", api_key=SECRET_KEY, max_retries=0
            )
            server.fail_next(401, message="Incorrect API key provided: {api_key}. You can find your API key at …")
            try:
                await chat.complete(HELLO)
            except BackendError as error:
                raised.append(error)
                raise
            finally:
                await chat.aclose()

        monkeypatch.setattr(loop, "_steps", imagine_with_openai)
        run = await loop.run_once(trigger="manual")

        # The secret really is in the exception and its traceback: the redaction has something to do.
        (error,) = raised
        import traceback

        assert SECRET_KEY in "".join(traceback.format_exception(error)) and server.statuses == [401]
        logging.getLogger("imagine.backends.openai_backend").error("imagining failed", exc_info=error)
        sys.excepthook(type(error), error, error.__traceback__)  # what Python runs for an uncaught exception
        status = await _status_reply(store, settings)
    await store.database.dispose()

    log, stderr = project_log.getvalue(), capsys.readouterr().err
    assert run.status == RunStatus.FAILED and run.error is not None
    texts = {"run record": run.error, "log": log, "stderr": stderr, "/status": status}
    for where, text in texts.items():
        assert SECRET_KEY not in text, f"the OpenAI key leaked into the {where}"
        assert "401" in text and "Incorrect API key provided" in text, f"the {where} lost the error: {text}"
        assert MASK in text, where
    assert "Traceback" in log and "AuthenticationError" in log and "Traceback" in stderr
    assert "improvement run" in log and f"#{run.id} failed" in status


CHILD = textwrap.dedent(
    """
    import asyncio, os
    from sqlalchemy.engine import make_url
    from storage.database import Database

    async def main():
        url = os.environ["DATABASE_URL"]
        database = Database(url)
        try:
            await database.create_schema()
        except Exception as error:
            password = make_url(url).password
            raise RuntimeError(f"cannot open {url} (user bob, password {password})") from error
        finally:
            await database.dispose()

    asyncio.run(main())
    """
)


async def test_database_password_in_a_child_traceback_reaches_no_log_file_run_record_or_reply(
    tmp_path: Path, project_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable = f"postgresql://bob:{DB_PASSWORD}@127.0.0.1:1/reverie"  # port 1: refused, a real connect error
    settings = _settings(tmp_path, imagine_backend="scripted", database_url=unreachable)
    store = await _sqlite_store(tmp_path)  # the run records live elsewhere; the child gets the unreachable URL
    loop = ImprovementLoop(store=store, settings=settings, task=TASK)  # registers the password
    log_path = tmp_path / "step.log"

    async def child_step(*_: object) -> None:
        env = {**__import__("os").environ, "DATABASE_URL": unreachable}
        await _step("imagine", [sys.executable, "-c", CHILD], log_path=log_path, time_limit_s=60, env=env)

    monkeypatch.setattr(loop, "_steps", child_step)
    run = await loop.run_once(trigger="manual")
    status = await _status_reply(store, settings)
    await store.database.dispose()

    assert run.status == RunStatus.FAILED and run.error is not None
    texts = {
        "step log": log_path.read_text(),
        "run record": run.error,
        "log": project_log.getvalue(),
        "/status": status,
    }
    assert "Traceback" in texts["step log"] and "OperationalError" in texts["step log"]
    for where, text in texts.items():
        assert DB_PASSWORD not in text, f"the database password leaked into the {where}"
    for where in ("step log", "run record", "log"):  # /status quotes only the first 200 characters of the error
        assert "cannot open postgresql://bob:" in texts[where] and MASK in texts[where], where
    assert "imagine failed" in status
