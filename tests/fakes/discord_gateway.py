"""A wire-level fake of Discord for testing the real discord.py client offline.

:class:`FakeDiscord` serves, on 127.0.0.1 (port 0), the REST API routes a bot calls and a websocket gateway
that speaks the real protocol: HELLO (op 10) → IDENTIFY (op 2) → READY + GUILD_CREATE, heartbeat ACK (op 11),
then ``MESSAGE_CREATE`` and ``INTERACTION_CREATE`` dispatches that a test triggers (a user typing a message,
running a slash command, clicking a button). While it runs, ``discord.http.Route.BASE`` and
``DiscordWebSocket.DEFAULT_GATEWAY`` point at it.

Like Discord it checks what it can see on the wire: the bot token on every REST call, slash commands only when
they were registered (bulk overwrite) where they are used and with options they declare, one callback per
interaction, and message content blanked for bots without the message-content intent (except DMs and mentions).
Every REST call is recorded in :attr:`FakeDiscord.calls` for assertions.

Sharding: more guilds can be added (``extra_guild_ids``, each with one text channel, :meth:`FakeDiscord.channel_of`).
A client that IDENTIFYs with ``shard: [id, count]`` gets only its shard's guilds (``(guild_id >> 22) % count``,
Discord's formula) in READY and GUILD_CREATE, and only their events; DMs go to shard 0, as on Discord. Several
clients (replicas) may be connected at once; each session's shard is kept in :attr:`FakeDiscord.shards`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl
from aiohttp import WSMsgType, web

API_PREFIX = "/api/v10"
MESSAGE_CONTENT_INTENT = 1 << 15
#: Interaction callback types (Discord API): message, deferred message ("thinking"), deferred update, update.
CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE, CALLBACK_DEFERRED_UPDATE, CALLBACK_UPDATE = 4, 5, 6, 7
EPHEMERAL_FLAG = 1 << 6
_JSON = "application/json"  # exactly: discord.py only parses bodies whose content-type is this string


@dataclass(frozen=True)
class RestCall:
    """One REST request the client made."""

    method: str
    path: str  # without the /api/v10 prefix
    query: dict[str, str]
    body: Any  # parsed JSON (or the payload_json part of a multipart body); None when empty


@dataclass
class FakeUser:
    """A Discord user the tests act as."""

    id: int
    name: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        """The user object as Discord sends it."""
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": self.name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
        }


@dataclass
class InteractionLog:
    """What happened to one interaction: its callback and the messages the user saw because of it."""

    id: int
    token: str
    channel_id: int
    dm: bool
    callback_type: int | None = None
    #: Messages shown for this interaction in order: the original response first (when it has content).
    messages: list[dict[str, Any]] = field(default_factory=list)
    original: dict[str, Any] | None = None
    original_deleted: bool = False

    @property
    def deferred(self) -> bool:
        """Whether the bot acknowledged with a deferral first."""
        return self.callback_type in (CALLBACK_DEFERRED_MESSAGE, CALLBACK_DEFERRED_UPDATE)

    def visible(self) -> list[dict[str, Any]]:
        """Messages with content the user sees now (the deleted original and the empty "thinking" one left out)."""
        return [
            message
            for message in self.messages
            if message.get("content") and not (message is self.original and self.original_deleted)
        ]

    def texts(self) -> list[str]:
        """The text of :meth:`visible`."""
        return [message["content"] for message in self.visible()]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def custom_ids(message: dict[str, Any]) -> list[str]:
    """Every button custom id in a message payload (its action rows)."""
    found = []
    for row in message.get("components") or []:
        for component in row.get("components", []):
            if "custom_id" in component:
                found.append(component["custom_id"])
    return found


class FakeDiscord:
    """Fake Discord REST API + gateway for one bot application, one guild with one text channel.

    Use as ``async with FakeDiscord() as fake:``; it patches discord.py's endpoints while open.
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        application_id: int = 1_100_000_000_000_001,
        guild_id: int = 1_200_000_000_000_001,
        channel_id: int = 1_300_000_000_000_001,
        extra_guild_ids: tuple[int, ...] = (),
    ) -> None:
        self.token = token
        self.application_id = application_id
        self.guild_id = guild_id
        self.channel_id = channel_id
        #: Every guild the bot is in, the first one being ``guild_id``; each has one text channel.
        self.guild_ids: list[int] = [guild_id, *extra_guild_ids]
        self._channels: dict[int, int] = {g: channel_id + index for index, g in enumerate(self.guild_ids)}
        #: ``[shard_id, shard_count]`` of each identified session (``None``: unsharded), in identify order.
        self.shards: list[list[int] | None] = []
        self._socket_shards: dict[web.WebSocketResponse, list[int] | None] = {}
        self.bot_user = FakeUser(application_id, "reverie", bot=True)
        self.calls: list[RestCall] = []
        self.unknown_calls: list[RestCall] = []
        self.unauthorized_calls: list[RestCall] = []
        self.identify: dict[str, Any] | None = None
        #: Registered commands: ``None`` → global, a guild id → that guild's.
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.interactions: dict[str, InteractionLog] = {}
        #: Messages the bot posted to a channel, by channel id.
        self.channel_messages: dict[int, list[dict[str, Any]]] = {}
        self._ids = itertools.count(1_900_000_000_000_001)
        self._sequence = itertools.count(1)
        self._changed = asyncio.Condition()
        self._identified = asyncio.Event()
        #: IDENTIFYs accepted so far: one per (re)started bot.
        self.sessions = 0
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._patched: list[tuple[object, str, object]] = []
        self._failures: list[tuple[str, re.Pattern[str], int, dict[str, Any]]] = []
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", API_PREFIX + "/{path:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._patch(discord.http.Route, "BASE", f"http://127.0.0.1:{self.port}{API_PREFIX}")
        self._patch(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(self.gateway_url))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for socket in list(self._sockets):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for owner, name, old in reversed(self._patched):
            setattr(owner, name, old)
        self._patched.clear()

    def _patch(self, owner: object, name: str, value: object) -> None:
        self._patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    @property
    def gateway_url(self) -> str:
        """The websocket URL of the fake gateway."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    # --- waiting -----------------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> Any:
        """Wait until ``predicate()`` is truthy (checked after every request); return its value."""

        async def wait() -> Any:
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"fake Discord: timed out waiting for {what}; REST calls: {self.call_summary()}"
            ) from None

    async def wait_until_ready(self, commands_in: int | None, *, session: int = 1, timeout: float = 30.0) -> None:
        """Wait until the ``session``-th connection identified and synced its commands to a guild (``None``: global).

        A restarted bot is the second session, and so on.
        """
        scope = f"guilds/{commands_in}/commands" if commands_in is not None else "commands"
        pattern = rf"/applications/{self.application_id}/{scope}"
        await self.wait_for(
            lambda: self.sessions >= session and len(self.calls_to("PUT", pattern)) >= session,
            timeout=timeout,
            what=f"session {session} to identify and sync commands ({scope})",
        )

    def fail_next(
        self, method: str, pattern: str, *, status: int = 403, message: str = "Missing Permissions", code: int = 50013
    ) -> None:
        """Answer the next ``method`` call whose path fully matches ``pattern`` with a Discord error."""
        self._failures.append((method, re.compile(pattern), status, {"message": message, "code": code}))

    def call_summary(self) -> list[str]:
        """``METHOD path`` of every REST call so far (for failure messages)."""
        return [f"{call.method} {call.path}" for call in self.calls]

    def calls_to(self, method: str, pattern: str) -> list[RestCall]:
        """Recorded calls with this method whose path fully matches the regex ``pattern``."""
        regex = re.compile(pattern)
        return [call for call in self.calls if call.method == method and regex.fullmatch(call.path)]

    # --- acting as users ---------------------------------------------------------------------------

    async def send_user_message(
        self,
        user: FakeUser,
        content: str,
        *,
        dm: bool = False,
        mention_bot: bool = False,
        channel_id: int | None = None,
    ) -> dict[str, Any]:
        """A user posts a message (in the guild channel, or in their DM channel with the bot)."""
        channel = channel_id or (self.dm_channel_id(user) if dm else self.channel_id)
        if mention_bot:
            content = f"<@{self.bot_user.id}> {content}"
        message: dict[str, Any] = self._message_payload(channel, user, content, guild=not dm)
        if mention_bot:
            message["mentions"] = [self.bot_user.payload()]
        delivered = dict(message)
        if not dm and not mention_bot and not self._has_intent(MESSAGE_CONTENT_INTENT):
            # What Discord does for bots without the privileged intent: guild messages arrive without content.
            delivered["content"] = ""
        await self.dispatch("MESSAGE_CREATE", delivered)
        return message

    def channel_of(self, guild_id: int) -> int:
        """The text channel of a guild."""
        return self._channels[guild_id]

    def guild_of(self, channel_id: int) -> int | None:
        """The guild a channel belongs to (``None``: a DM channel)."""
        return next((g for g, c in self._channels.items() if c == channel_id), None)

    @staticmethod
    def shard_of(guild_id: int | None, shard_count: int) -> int:
        """The shard that receives a guild's events (Discord's formula); DMs go to shard 0."""
        return 0 if guild_id is None else (guild_id >> 22) % shard_count

    def dm_channel_id(self, user: FakeUser) -> int:
        """The id of the DM channel between ``user`` and the bot (stable per user)."""
        return 1_400_000_000_000_000 + user.id % 1_000_000

    async def run_slash_command(
        self, user: FakeUser, name: str, options: dict[str, Any] | None = None, *, dm: bool = False
    ) -> InteractionLog:
        """A user runs ``/name`` with option values; Discord would refuse unregistered commands and options."""
        scope = None if dm else self.guild_id
        registered = {c["name"]: c for c in self.commands.get(scope, [])}
        global_commands = {c["name"]: c for c in self.commands.get(None, [])}
        command = registered.get(name) or global_commands.get(name)
        if command is None:
            raise AssertionError(f"/{name} is not registered for {'DMs' if dm else 'the guild'}: {self.commands}")
        declared = {option["name"]: option for option in command.get("options", [])}
        option_payloads = []
        for option_name, value in (options or {}).items():
            if option_name not in declared:
                raise AssertionError(f"/{name} has no option {option_name!r}; declared: {sorted(declared)}")
            _check_option_value(name, declared[option_name], value)
            option_payloads.append({"name": option_name, "type": declared[option_name]["type"], "value": value})
        missing = [o["name"] for o in declared.values() if o.get("required") and o["name"] not in (options or {})]
        if missing:
            raise AssertionError(f"/{name} needs option(s) {missing}; Discord would not send it")
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1, "options": option_payloads}
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return await self._interact(user, type_=2, data=data, dm=dm)

    async def click_button(self, user: FakeUser, message: dict[str, Any], custom_id: str) -> InteractionLog:
        """A user clicks the button ``custom_id`` on ``message`` (a payload the bot sent)."""
        if custom_id not in custom_ids(message):
            raise AssertionError(f"no button {custom_id!r} on that message: {custom_ids(message)}")
        dm = "guild_id" not in message
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._interact(user, type_=3, data=data, dm=dm, message=message)

    async def _interact(
        self, user: FakeUser, *, type_: int, data: dict[str, Any], dm: bool, message: dict[str, Any] | None = None
    ) -> InteractionLog:
        interaction_id = next(self._ids)
        token = f"itoken-{interaction_id}"
        channel_id = self.dm_channel_id(user) if dm else self.channel_id
        log = InteractionLog(id=interaction_id, token=token, channel_id=channel_id, dm=dm)
        self.interactions[token] = log
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": type_,
            "data": data,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "app_permissions": "2248473465835073",
            "attachment_size_limit": 8 * 1024 * 1024,
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)} if not dm else {},
            "context": 1 if dm else 0,
        }
        if dm:
            payload["channel_id"] = str(channel_id)
            payload["channel"] = {"id": str(channel_id), "type": 1, "recipients": [user.payload()]}
            payload["user"] = user.payload()
        else:
            payload["guild_id"] = str(self.guild_id)
            payload["guild_locale"] = "en-US"
            payload["channel_id"] = str(self.channel_id)
            payload["channel"] = self._channel_payload()
            payload["member"] = self._member_payload(user)
        if message is not None:
            payload["message"] = message
        await self.dispatch("INTERACTION_CREATE", payload)
        return log

    async def wait_for_interaction(
        self, log: InteractionLog, *, messages: int = 1, timeout: float = 30.0
    ) -> InteractionLog:
        """Wait until the interaction was answered with at least ``messages`` visible messages."""
        await self.wait_for(
            lambda: log.callback_type is not None and len(log.visible()) >= messages,
            timeout=timeout,
            what=f"{messages} message(s) answering interaction {log.id}",
        )
        return log

    async def wait_for_channel_messages(self, channel_id: int, count: int, *, timeout: float = 30.0) -> list[dict]:
        """Wait until the bot posted at least ``count`` messages to ``channel_id``; return them."""
        return await self.wait_for(
            lambda: len(self.channel_messages.get(channel_id, [])) >= count and self.channel_messages[channel_id],
            timeout=timeout,
            what=f"{count} bot message(s) in channel {channel_id}",
        )

    # --- gateway -----------------------------------------------------------------------------------

    def _has_intent(self, bit: int) -> bool:
        return bool(self.identify and int(self.identify.get("intents", 0)) & bit)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH (op 0) event to every connected client whose shard receives it (all when unsharded)."""
        await self._identified.wait()
        frame = {"op": 0, "t": event, "s": next(self._sequence), "d": data}
        guild = int(data["guild_id"]) if data.get("guild_id") else None
        for socket in list(self._sockets):
            shard = self._socket_shards.get(socket)
            if shard is not None and self.shard_of(guild, shard[1]) != shard[0]:
                continue
            await socket.send_str(json.dumps(frame))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.add(socket)
        try:
            await socket.send_json({"op": 10, "d": {"heartbeat_interval": 41_250}})
            async for frame in socket:
                if frame.type is not WSMsgType.TEXT:
                    continue
                message = json.loads(frame.data)
                if message["op"] == 1:  # heartbeat
                    await socket.send_json({"op": 11})
                elif message["op"] == 2:  # identify
                    await self._on_identify(socket, message["d"])
        finally:
            self._sockets.discard(socket)
            self._socket_shards.pop(socket, None)
        return socket

    async def _on_identify(self, socket: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if data.get("token") != self.token:
            await socket.close(code=4004, message=b"Authentication failed.")
            return
        self.identify = data
        shard = data.get("shard")
        shard = [int(shard[0]), int(shard[1])] if shard else None
        guilds = [g for g in self.guild_ids if shard is None or self.shard_of(g, shard[1]) == shard[0]]
        ready = {
            "v": 10,
            "user": self.bot_user.payload(),
            "guilds": [{"id": str(g), "unavailable": True} for g in guilds],
            "session_id": "fake-session",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
        }
        if shard is not None:
            ready["shard"] = shard
        await socket.send_json({"op": 0, "t": "READY", "s": next(self._sequence), "d": ready})
        for guild in guilds:
            payload = self._guild_payload(guild)
            await socket.send_json({"op": 0, "t": "GUILD_CREATE", "s": next(self._sequence), "d": payload})
        self._socket_shards[socket] = shard
        self.shards.append(shard)
        self.sessions += 1
        self._identified.set()
        await self._notify()

    # --- payloads ----------------------------------------------------------------------------------

    def _channel_payload(self, guild_id: int | None = None) -> dict[str, Any]:
        guild_id = guild_id or self.guild_id
        return {
            "id": str(self.channel_of(guild_id)),
            "type": 0,
            "guild_id": str(guild_id),
            "name": "general",
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }

    def _member_payload(self, user: FakeUser) -> dict[str, Any]:
        return {
            "user": user.payload(),
            "roles": [],
            "joined_at": _now(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": "2248473465835073",
        }

    def _guild_payload(self, guild_id: int | None = None) -> dict[str, Any]:
        guild_id = guild_id or self.guild_id
        return {
            "id": str(guild_id),
            "name": "Fake guild",
            "icon": None,
            "owner_id": "1",
            "unavailable": False,
            "large": False,
            "member_count": 2,
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": [
                {
                    "id": str(guild_id),
                    "name": "@everyone",
                    "permissions": "2248473465835073",
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                }
            ],
            "channels": [self._channel_payload(guild_id)],
            "members": [self._member_payload(self.bot_user)],
            "voice_states": [],
            "presences": [],
            "threads": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "joined_at": _now(),
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
        }

    def _message_payload(
        self, channel_id: int, author: FakeUser, content: str, *, guild: bool, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = body or {}
        message = {
            "id": str(next(self._ids)),
            "channel_id": str(channel_id),
            "author": author.payload(),
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "type": 0,
            "flags": int(body.get("flags") or 0),
        }
        if guild:
            message["guild_id"] = str(self.guild_of(channel_id) or self.guild_id)
            message["member"] = {k: v for k, v in self._member_payload(author).items() if k != "user"}
        return message

    # --- REST --------------------------------------------------------------------------------------

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": _JSON})

    async def _read_body(self, request: web.Request) -> Any:
        if not request.can_read_body:
            return None
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if getattr(part, "name", None) == "payload_json":
                    return json.loads(await part.text())  # type: ignore[union-attr]
            return None
        raw = await request.read()
        return json.loads(raw) if raw else None

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        call = RestCall(request.method, path, dict(request.query), await self._read_body(request))
        self.calls.append(call)
        try:
            # Interaction callbacks and followups authenticate by the interaction token in the path instead.
            needs_bot_token = not path.startswith(("/webhooks/", "/interactions/"))
            if needs_bot_token and request.headers.get("Authorization") != f"Bot {self.token}":
                self.unauthorized_calls.append(call)
                return self._json({"message": "401: Unauthorized", "code": 0}, status=401)
            for index, (method, pattern, status, error) in enumerate(self._failures):
                if method == request.method and pattern.fullmatch(path):
                    del self._failures[index]
                    return self._json(error, status)
            for method, route, handler in self._routes():
                match = re.fullmatch(route, path)
                if match and method == request.method:
                    return await handler(call, **match.groupdict())
            self.unknown_calls.append(call)
            return self._json({"message": f"fake Discord: unknown route {request.method} {path}", "code": 0}, 404)
        finally:
            await self._notify()

    def _routes(self) -> Iterator[tuple[str, str, Callable[..., Any]]]:
        app = str(self.application_id)
        yield "GET", r"/users/@me", self._get_me
        yield "GET", r"/oauth2/applications/@me", self._get_application
        yield "GET", r"/gateway(/bot)?", self._get_gateway
        yield "PUT", rf"/applications/{app}/commands", self._put_commands
        yield "PUT", rf"/applications/{app}/guilds/(?P<guild_id>\d+)/commands", self._put_commands
        yield "GET", rf"/applications/{app}/commands", self._get_commands
        yield "GET", rf"/applications/{app}/guilds/(?P<guild_id>\d+)/commands", self._get_commands
        yield "POST", r"/channels/(?P<channel_id>\d+)/typing", self._typing
        yield "POST", r"/channels/(?P<channel_id>\d+)/messages", self._create_message
        yield "POST", r"/interactions/(?P<interaction_id>\d+)/(?P<token>[^/]+)/callback", self._callback
        yield "POST", rf"/webhooks/{app}/(?P<token>[^/]+)", self._followup
        yield "PATCH", rf"/webhooks/{app}/(?P<token>[^/]+)/messages/@original", self._edit_original
        yield "DELETE", rf"/webhooks/{app}/(?P<token>[^/]+)/messages/@original", self._delete_original
        yield "GET", rf"/webhooks/{app}/(?P<token>[^/]+)/messages/@original", self._get_original

    async def _get_me(self, call: RestCall) -> web.Response:
        return self._json(self.bot_user.payload())

    async def _get_application(self, call: RestCall) -> web.Response:
        return self._json(
            {
                "id": str(self.application_id),
                "name": "Reverie (fake)",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": FakeUser(1, "owner").payload(),
                "verify_key": "0" * 64,
                "flags": 0,
            }
        )

    async def _get_gateway(self, call: RestCall) -> web.Response:
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        return self._json({"url": self.gateway_url, "shards": 1, "session_start_limit": limit})

    async def _put_commands(self, call: RestCall, guild_id: str | None = None) -> web.Response:
        registered = []
        for command in call.body or []:
            stored = dict(command, id=str(next(self._ids)), application_id=str(self.application_id), version="1")
            stored.setdefault("type", 1)
            if guild_id is not None:
                stored["guild_id"] = guild_id
            registered.append(stored)
        self.commands[int(guild_id) if guild_id else None] = registered
        return self._json(registered)

    async def _get_commands(self, call: RestCall, guild_id: str | None = None) -> web.Response:
        return self._json(self.commands.get(int(guild_id) if guild_id else None, []))

    async def _typing(self, call: RestCall, channel_id: str) -> web.Response:
        return web.Response(status=204)

    def _bot_message(self, channel_id: int, body: dict[str, Any], *, guild: bool) -> dict[str, Any]:
        return self._message_payload(channel_id, self.bot_user, body.get("content") or "", guild=guild, body=body)

    async def _create_message(self, call: RestCall, channel_id: str) -> web.Response:
        body = call.body or {}
        message = self._bot_message(int(channel_id), body, guild=self.guild_of(int(channel_id)) is not None)
        self.channel_messages.setdefault(int(channel_id), []).append(message)
        return self._json(message)

    def _interaction(self, token: str) -> InteractionLog | None:
        return self.interactions.get(token)

    async def _callback(self, call: RestCall, interaction_id: str, token: str) -> web.Response:
        log = self._interaction(token)
        if log is None or str(log.id) != interaction_id:
            return self._json({"message": "Unknown interaction", "code": 10062}, 404)
        if log.callback_type is not None:
            return self._json({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        body = call.body or {}
        log.callback_type = int(body["type"])
        data = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        interaction_info: dict[str, Any] = {"id": str(log.id), "type": 2}
        result: dict[str, Any] = {"interaction": interaction_info}
        if log.callback_type in (CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE):
            message = self._bot_message(log.channel_id, data, guild=not log.dm)
            log.original = message
            log.messages.append(message)
            interaction_info.update(
                response_message_id=message["id"],
                response_message_loading=log.callback_type == CALLBACK_DEFERRED_MESSAGE,
                response_message_ephemeral=bool(flags & EPHEMERAL_FLAG),
            )
            result["resource"] = {"type": log.callback_type, "message": message}
        if call.query.get("with_response") in ("1", "true", "True"):
            return self._json(result)
        return web.Response(status=204)

    async def _followup(self, call: RestCall, token: str) -> web.Response:
        log = self._interaction(token)
        if log is None or log.callback_type is None:
            return self._json({"message": "Unknown webhook", "code": 10015}, 404)
        message = self._bot_message(log.channel_id, call.body or {}, guild=not log.dm)
        log.messages.append(message)
        return self._json(message)

    async def _edit_original(self, call: RestCall, token: str) -> web.Response:
        log = self._interaction(token)
        if log is None or log.original is None or log.original_deleted:
            return self._json({"message": "Unknown message", "code": 10008}, 404)
        body = call.body or {}
        for key in ("content", "components", "embeds", "flags"):
            if key in body:
                log.original[key] = body[key] if body[key] is not None else ""
        return self._json(log.original)

    async def _delete_original(self, call: RestCall, token: str) -> web.Response:
        log = self._interaction(token)
        if log is None or log.original is None or log.original_deleted:
            return self._json({"message": "Unknown message", "code": 10008}, 404)
        log.original_deleted = True
        return web.Response(status=204)

    async def _get_original(self, call: RestCall, token: str) -> web.Response:
        log = self._interaction(token)
        if log is None or log.original is None or log.original_deleted:
            return self._json({"message": "Unknown message", "code": 10008}, 404)
        return self._json(log.original)


def _check_option_value(command: str, option: dict[str, Any], value: Any) -> None:
    """Refuse what Discord's own client refuses to send: wrong types, values outside choices or range."""
    expected = {3: str, 4: int, 10: (int, float), 5: bool}.get(option["type"], object)
    if not isinstance(value, expected):
        raise AssertionError(f"/{command} {option['name']}: {value!r} is not of option type {option['type']}")
    choices = [choice["value"] for choice in option.get("choices") or []]
    if choices and value not in choices:
        raise AssertionError(f"/{command} {option['name']}: {value!r} is not one of {choices}")
    low, high = option.get("min_value"), option.get("max_value")
    if (low is not None and value < low) or (high is not None and value > high):
        raise AssertionError(f"/{command} {option['name']}: {value!r} outside {low}..{high}")


def is_ephemeral(message: dict[str, Any]) -> bool:
    """Whether a message payload carries the ephemeral flag."""
    return bool(int(message.get("flags") or 0) & EPHEMERAL_FLAG)
