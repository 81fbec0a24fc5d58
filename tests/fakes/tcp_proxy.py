"""A TCP proxy on 127.0.0.1 between the bot and a real PostgreSQL server, for faults a server cannot stage.

``pg_terminate_backend`` ends a session *before* a commit (the transaction rolls back). The nastier fault is a
commit the server applied whose acknowledgement never reached the client: the client sees a dropped connection
and cannot tell whether its write happened. :meth:`TcpProxy.lose_commit_acks` stages exactly that: the proxy
forwards the next ``COMMIT`` to the server, waits for the server's answer, and cuts the connection instead of
passing the answer on.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """``async with TcpProxy(port) as proxy:`` then connect to ``127.0.0.1:proxy.port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._lost_acks_left = 0
        #: How many commit acknowledgements were swallowed (each applied on the server).
        self.lost_acks = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def lose_commit_acks(self, times: int = 1) -> None:
        """Swallow the server's answer to the next ``times`` COMMITs and drop those connections."""
        self._lost_acks_left += times

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        swallow = asyncio.Event()  # set once a COMMIT whose answer is to be lost went to the server
        answered = asyncio.Event()  # the server answered it: the commit is durable, the client never hears so

        async def client_to_server() -> None:
            while data := await client_reader.read(65536):
                # psycopg commits with a simple-protocol query message ('Q') "COMMIT"; the client waits for
                # every earlier answer before sending it, so the server's next bytes answer this COMMIT.
                if self._lost_acks_left > 0 and data[:1] == b"Q" and b"COMMIT" in data.upper():
                    self._lost_acks_left -= 1
                    swallow.set()
                server_writer.write(data)
                await server_writer.drain()

        async def server_to_client() -> None:
            while data := await server_reader.read(65536):
                if swallow.is_set():
                    self.lost_acks += 1
                    answered.set()
                    return
                client_writer.write(data)
                await client_writer.drain()

        pumps = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (client_writer, server_writer):
                with contextlib.suppress(Exception):
                    writer.transport.abort()  # a hard drop, as a failing network does
            self._tasks.discard(task)
