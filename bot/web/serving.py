"""Serve an ASGI application with uvicorn on the caller's event loop until a stop event is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to :func:`bot.server.stop_on_signals` (the process owns them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install nothing: SIGINT/SIGTERM already stop the whole process gracefully."""
        yield


async def run_http(
    app: ASGIApp, host: str, port: int, stop: asyncio.Event, *, started: asyncio.Event | None = None
) -> None:
    """Serve ``app`` on ``host:port`` until ``stop`` is set; ``started`` is set once it listens."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(), name="http")
    try:
        while not server.started:
            if task.done():
                task.result()  # e.g. the port is taken: raise it
                raise RuntimeError(f"the HTTP server on {host}:{port} ended before it started")
            await asyncio.sleep(0.02)
        logger.info("HTTP server on %s:%d (/healthz, /readyz, /metrics)", host, port)
        if started is not None:
            started.set()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if task in done:
            task.result()
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
