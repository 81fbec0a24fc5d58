"""The composition root: settings → store → task → policy → :class:`DialogueService` → adapters.

``reverie serve`` runs every platform whose token is configured (Telegram, Discord) on one event loop,
plus the idle-session sweeper and, through an optional hook, the improvement loop; with no token it runs
the terminal chat. SIGINT/SIGTERM stop it gracefully: adapters stop taking updates, replies in flight
finish and are logged, open conversations stay open in the database to be resumed after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from bot.context import open_store
from bot.events import Improver
from bot.policy_holder import PolicyHolder
from bot.service import DialogueService
from bot.settings import Settings
from bot.web.metrics import BotMetrics, ErrorLogCounter, MeteredDialogueService
from imagine.task import TaskSpec, load_task
from learning.devices import resolve_device
from learning.interface import Policy
from storage import Store

logger = logging.getLogger(__name__)

#: Seconds between sweeps for idle sessions.
EXPIRY_INTERVAL_S = 60.0

#: Loads a policy for serving (blocking): ``(source, version_id)``, source "base" or a checkpoint directory.
PolicyLoader = Callable[[str, int | None], Policy]
#: Runs one platform until ``stop`` is set: ``run_telegram`` / ``run_discord``.
AdapterRunner = Callable[[DialogueService, Settings, asyncio.Event], Awaitable[None]]


class ServeError(RuntimeError):
    """The server cannot run as configured."""


@dataclass
class Runtime:
    """Everything a serving process is made of; handed to the improvement hook."""

    settings: Settings
    store: Store
    task: TaskSpec
    policies: PolicyHolder
    service: DialogueService
    load_policy: PolicyLoader
    #: What ``/metrics`` exports; the service counts into it.
    metrics: BotMetrics | None = None


#: Starts the improvement loop (scheduler included) for a runtime and stops it on exit; yields the
#: :class:`Improver` behind ``/retrain``, ``/rollback`` and ``/status`` (or ``None`` when disabled).
ImproverHook = Callable[[Runtime], AbstractAsyncContextManager[Improver | None]]


def policy_loader(settings: Settings, task: TaskSpec) -> PolicyLoader:
    """A :data:`PolicyLoader` with the configured base model, device and decoding settings."""
    device = resolve_device(settings.device)

    def load(source: str, version_id: int | None) -> Policy:
        import torch

        from learning.policy import load_policy  # torch and transformers load only when a policy is needed

        # loading computes little; one thread here keeps OpenMP's pools within the CPUs (LearnedPolicy.threads)
        torch.set_num_threads(1)
        return load_policy(
            source,
            task=task,
            base_model=settings.base_model,
            cache_dir=settings.resolved_model_cache_dir,
            device=device,
            version_id=version_id,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            beta=settings.beta,
            # all the CPUs while nothing else of ours computes; the improvement loop lowers it to serving's share
            # while its children run (PolicyHolder.set_threads)
            threads=settings.resolved_idle_torch_threads,
        )

    return load


async def load_active_policy(store: Store, load: PolicyLoader) -> Policy:
    """The active version's checkpoint if it loads, else the prompted base model (logged, never fatal)."""
    version = await store.active_policy_version()
    if version is not None:
        if Path(version.path).is_dir():
            try:
                return await asyncio.to_thread(load, version.path, version.id)
            except Exception:
                logger.exception("cannot load active policy version %s from %s", version.id, version.path)
        else:
            logger.error("active policy version %s: checkpoint %s is missing", version.id, version.path)
        logger.warning("serving the prompted base model instead")
    return await asyncio.to_thread(load, "base", None)


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, *, improver_hook: ImproverHook | None = None) -> AsyncIterator[Runtime]:
    """Build the serving stack; on exit wait for turns in flight, stop the improver, close policy and store."""
    task = load_task(settings.task)
    async with open_store(settings) as store, contextlib.AsyncExitStack() as stack:
        load = policy_loader(settings, task)
        policies = PolicyHolder(await load_active_policy(store, load), threads=settings.resolved_idle_torch_threads)
        stack.callback(policies.close)
        metrics = BotMetrics()
        service = MeteredDialogueService(metrics=metrics, store=store, policies=policies, task=task, settings=settings)
        runtime = Runtime(settings, store, task, policies, service, load, metrics)
        if improver_hook is not None:
            service.improver = await stack.enter_async_context(improver_hook(runtime))
            metrics.observe_improver(service.improver)
        # Registered last, so it runs first: turns finish before the improver and the policy go away.
        stack.push_async_callback(service.shutdown)
        logger.info("serving task %r with policy %s", task.name, policies.name)
        yield runtime


async def expire_periodically(service: DialogueService, stop: asyncio.Event, interval_s: float) -> None:
    """Close idle sessions every ``interval_s`` until ``stop`` is set; a failed sweep is logged and retried."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        try:
            expired = await service.expire_idle_sessions()
            if expired:
                logger.info("closed %d idle conversation%s", expired, "" if expired == 1 else "s")
        except Exception:
            logger.exception("idle-session sweep failed")


def token_set(token: SecretStr | None) -> bool:
    """Whether a platform token is configured: ``TOKEN=`` (as copied from ``.env.example``) means off."""
    return token is not None and bool(token.get_secret_value().strip())


def configured_adapters(settings: Settings) -> dict[str, AdapterRunner]:
    """The platform runners whose token is set (imported lazily: each pulls in its client library)."""
    runners: dict[str, AdapterRunner] = {}
    if token_set(settings.telegram_token):
        try:
            from bot.adapters.telegram import run_telegram

            runners["telegram"] = run_telegram
        except ImportError:
            logger.exception("TELEGRAM_TOKEN is set but the Telegram adapter cannot be imported")
    if token_set(settings.discord_token):
        try:
            from bot.adapters.discord import run_discord

            runners["discord"] = run_discord
        except ImportError:
            logger.exception("DISCORD_TOKEN is set but the Discord adapter cannot be imported")
    return runners


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop``; a second SIGINT falls back to the default (immediate) behaviour."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def request_stop(signum: signal.Signals) -> None:
        logger.info("%s received: finishing replies in flight, then stopping", signum.name)
        stop.set()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, request_stop, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or not Unix
            pass
    try:
        yield
    finally:
        for signum in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


async def run_adapters(
    service: DialogueService, settings: Settings, runners: dict[str, AdapterRunner], stop: asyncio.Event
) -> None:
    """Run platform adapters until ``stop`` is set or every one of them has ended; then stop them all."""
    tasks = {
        asyncio.create_task(runner(service, settings, stop), name=f"adapter-{name}"): name
        for name, runner in runners.items()
    }
    stopping = asyncio.ensure_future(stop.wait())
    pending = set(tasks)
    try:
        while pending and not stop.is_set():
            done, pending = await asyncio.wait(pending | {stopping}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stopping)
            for task in done - {stopping}:
                _log_adapter_end(tasks[task], task)
        stop.set()
        await asyncio.gather(*pending, return_exceptions=True)  # each adapter finishes its replies in flight
        for task in pending:
            _log_adapter_end(tasks[task], task)
    finally:
        stopping.cancel()
        for task in tasks:
            task.cancel()


def _log_adapter_end(name: str, task: asyncio.Task[None]) -> None:
    if task.cancelled():
        logger.info("%s adapter cancelled", name)
    elif task.exception() is not None:
        logger.error("%s adapter failed: %s", name, task.exception(), exc_info=task.exception())
    else:
        logger.info("%s adapter stopped", name)


async def serve(
    settings: Settings, *, improver_hook: ImproverHook | None = None, stop: asyncio.Event | None = None
) -> None:
    """Serve every configured platform (or the terminal chat) until a signal, ``stop`` or end of input."""
    from bot.adapters.console import run_console
    from bot.web.health import ADAPTERS

    stop = stop or asyncio.Event()
    runners = configured_adapters(settings)
    # Declared before the HTTP server starts: /readyz stays 503 until every adapter is connected.
    ADAPTERS.expect(*runners)
    with stop_on_signals(stop):
        async with open_runtime(settings, improver_hook=improver_hook) as runtime, http_server(runtime, stop):
            sweeper = asyncio.create_task(expire_periodically(runtime.service, stop, EXPIRY_INTERVAL_S))
            try:
                if not runners and (token_set(settings.telegram_token) or token_set(settings.discord_token)):
                    raise ServeError("a platform token is set but no adapter could start (see the log above)")
                if runners:
                    logger.info("starting adapters: %s", ", ".join(runners))
                    await run_adapters(runtime.service, settings, runners, stop)
                else:
                    logger.info("no platform token configured: chatting in the terminal")
                    await run_console(runtime.service, stop)
            finally:
                stop.set()
                await sweeper


@contextlib.asynccontextmanager
async def http_server(runtime: Runtime, stop: asyncio.Event) -> AsyncIterator[None]:
    """Run the process's HTTP server (probes, metrics, webhooks, page) on ``HTTP_PORT`` for the block; with no
    port, nothing. It starts listening before the block runs, so webhooks can be registered in it."""
    settings = runtime.settings
    if settings.http_port is None:
        yield
        return
    from bot.web.app import build_app
    from bot.web.serving import run_http

    assert runtime.metrics is not None
    from bot import redaction

    for secret in (settings.admin_token, settings.telegram_webhook_secret):  # scrubbed from every log record
        if secret is not None:
            redaction.REDACTOR.add(secret.get_secret_value())
    counter = ErrorLogCounter(runtime.metrics)
    logging.getLogger().addHandler(counter)
    started = asyncio.Event()
    http_stop = asyncio.Event()
    app = build_app(runtime, runtime.metrics)
    task = asyncio.create_task(
        run_http(app, settings.http_host, settings.http_port, http_stop, started=started), name="http"
    )
    try:
        waiting = asyncio.ensure_future(started.wait())
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            task.result()  # it could not listen: raise why
        yield
    finally:
        # Last to stop: probes and metrics answer while the adapters finish their replies.
        http_stop.set()
        with contextlib.suppress(Exception):
            await task
        logging.getLogger().removeHandler(counter)


def default_improver_hook() -> ImproverHook | None:
    """The improvement loop's hook, ``bot.improve.improvement_hook`` (``None`` where it cannot be imported)."""
    try:
        from bot.improve import improvement_hook
    except ImportError:
        logger.exception("the improvement loop cannot be imported: /retrain and /rollback are off")
        return None
    return improvement_hook
