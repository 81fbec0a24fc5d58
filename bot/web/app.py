"""The Starlette application of a serving process: ``/healthz``, ``/readyz``, ``/metrics``, webhooks, the page.

Probes for an orchestrator: ``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only when
the database answers, a policy is loaded and every adapter the process runs is connected (503 with the reasons
otherwise), so a load balancer sends webhooks only to replicas that can handle them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bot.web.health import ADAPTERS, AdapterHealth
from bot.web.metrics import BotMetrics

if TYPE_CHECKING:
    from bot.server import Runtime

logger = logging.getLogger(__name__)

#: Longest wait for the database's ``SELECT 1`` in ``/readyz``.
READY_DB_TIMEOUT_S = 3.0

WebhookHandler = Callable[[Request], Awaitable[Response]]


class Webhooks:
    """POST routes that adapters add while they run (Telegram's webhook path), looked up per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: dict[str, WebhookHandler] = {}

    def register(self, path: str, handler: WebhookHandler) -> None:
        """Serve ``POST path`` with ``handler`` until :meth:`unregister`."""
        with self._lock:
            self._handlers["/" + path.strip("/")] = handler

    def unregister(self, path: str) -> None:
        """Stop serving ``path`` (404 afterwards)."""
        with self._lock:
            self._handlers.pop("/" + path.strip("/"), None)

    def get(self, path: str) -> WebhookHandler | None:
        """The handler of ``path``, if any."""
        with self._lock:
            return self._handlers.get("/" + path.strip("/"))


#: The process's webhook routes (adapters register here; :func:`build_app` serves them).
WEBHOOKS = Webhooks()


def build_app(
    runtime: Runtime,
    metrics: BotMetrics,
    *,
    adapters: AdapterHealth = ADAPTERS,
    webhooks: Webhooks = WEBHOOKS,
) -> Starlette:
    """The process's HTTP application over ``runtime``."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        checks: dict[str, object] = {}
        try:
            await asyncio.wait_for(_ping(runtime), READY_DB_TIMEOUT_S)
            checks["database"] = True
        except Exception as error:  # the reason only: a driver message may quote the URL, so not its text
            checks["database"] = False
            logger.warning("readiness: database unreachable (%s)", type(error).__name__)
        checks["policy"] = runtime.policies.name if runtime.policies.name else False
        states = adapters.states()
        checks["adapters"] = states
        ready = bool(checks["database"]) and bool(checks["policy"]) and all(states.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        try:
            await metrics.refresh(runtime.store, runtime.policies)
        except Exception as error:  # the counters still come out; the shared values keep their last reading
            logger.warning("metrics: cannot read the database (%s)", type(error).__name__)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def webhook(request: Request) -> Response:
        handler = webhooks.get(request.url.path)
        if handler is None:
            return PlainTextResponse("not found\n", status_code=404)
        return await handler(request)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    from bot.web.page import page_routes

    routes.extend(page_routes(runtime))
    routes.append(Route("/{path:path}", webhook, methods=["POST"]))
    return Starlette(routes=routes)


async def _ping(runtime: Runtime) -> None:
    async with runtime.store.database.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
