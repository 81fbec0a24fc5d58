"""A fake Telegram Bot API server (aiohttp on 127.0.0.1, port 0) for driving the real python-telegram-bot.

It implements the methods Reverie's adapter uses (``getMe``, ``getUpdates`` with offset and long-poll timeout,
``sendMessage``, ``sendChatAction``, ``setMyCommands``, ``getMyCommands``, ``answerCallbackQuery``,
``editMessageReplyMarkup``, ``deleteWebhook``), records every call, and offers helpers to play the user's side:
inject a text message, a command or a button press, and await what the bot sent.

Point an application at it with ``ApplicationBuilder().token(server.token).base_url(server.base_url)``.

Webhooks: ``setWebhook`` / ``getWebhookInfo`` / ``deleteWebhook`` as Telegram has them (``getUpdates`` answers 409
Conflict while a webhook is set). Telegram posts to the one public URL; here the server also plays the load
balancer in front of the replicas: :attr:`FakeTelegramServer.webhook_targets` lists their base URLs, and each update
is POSTed (with the secret token header) to the next one, round robin. An update is confirmed only by a 200; on an
error or a dropped connection it is delivered again, to the next replica — as Telegram redelivers unconfirmed
updates. Every attempt is kept in :attr:`FakeTelegramServer.deliveries`.
PTB sends form-encoded bodies whose non-string values are JSON strings (``reply_markup``, ``commands``); JSON bodies
are accepted too. Answers have the Bot API shape ``{"ok": true, "result": ...}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

#: Parameters that PTB encodes as JSON strings inside a form body.
_JSON_PARAMETERS = frozenset(
    {
        "reply_markup",
        "commands",
        "scope",
        "allowed_updates",
        "entities",
        "reply_parameters",
        "link_preview_options",
        "caption_entities",
    }
)
_MENTION = re.compile(r"@\w+")
_COMMAND = re.compile(r"^/\w+(?:@\w+)?")

JSONDict = dict[str, Any]


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units, the unit Telegram uses for entity offsets."""
    return len(text.encode("utf-16-le")) // 2


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One request the bot made: the method name, its decoded parameters and when it arrived."""

    method: str
    params: JSONDict
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One attempt to deliver an update by webhook: where it went and the HTTP status (None: no answer)."""

    update_id: int
    target: str
    status: int | None


@dataclass(slots=True)
class _Failure:
    method: str
    error_code: int
    description: str
    retry_after: int | None
    remaining: int


class FakeTelegramServer:
    """An in-process Bot API: the bot talks to it over HTTP, the test plays the users.

    Use as ``async with FakeTelegramServer() as server:``. All helpers must run on the server's event loop.
    """

    def __init__(
        self,
        *,
        token: str = "123456789:TEST-fake-token-AAAAAAAAAAAAAAAAAAAAAA",
        bot_id: int = 999_000_001,
        bot_username: str = "reverie_test_bot",
    ) -> None:
        self.token = token
        self.bot_user: JSONDict = {
            "id": bot_id,
            "is_bot": True,
            "first_name": "Reverie",
            "username": bot_username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        #: Every request in arrival order (also those answered with an error).
        self.calls: list[ApiCall] = []
        #: Every message the bot sent, in order.
        self.sent_messages: list[JSONDict] = []
        #: Commands per scope type as last set by ``setMyCommands`` (key: JSON of the scope).
        self.commands_by_scope: dict[str, list[JSONDict]] = {}
        self._updates: list[JSONDict] = []
        self._update_ids = itertools.count(1)
        self._message_ids: defaultdict[int, itertools.count[int]] = defaultdict(lambda: itertools.count(1))
        self._callback_ids = itertools.count(1)
        self._messages: dict[tuple[int, int], JSONDict] = {}
        self._read_cursor: defaultdict[int, int] = defaultdict(int)
        self._changed = asyncio.Condition()
        self._failures: list[_Failure] = []
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.port = 0
        #: The webhook as set by ``setWebhook`` (``url``, ``secret_token``, ...), None while polling.
        self.webhook: JSONDict | None = None
        #: Base URLs of the replicas behind the load balancer that webhook deliveries go to, round robin.
        self.webhook_targets: list[str] = []
        #: Every webhook delivery attempt, in order.
        self.deliveries: list[WebhookDelivery] = []
        #: Longest a replica may take to answer one delivery (it answers once the update is handled).
        self.webhook_timeout_s = 120.0
        self._unconfirmed: dict[int, JSONDict] = {}
        self._round_robin = itertools.count()
        self._delivery_tasks: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None
        #: Every update ever injected, by id.
        self.updates_by_id: dict[int, JSONDict] = {}
        #: Webhook deliveries under way: update id → the replica it was posted to.
        self.in_flight: dict[int, str] = {}
        #: Calls waiting at a :meth:`hold` gate (method and parameters), in arrival order.
        self.held: list[ApiCall] = []
        self._holds: set[str] = set()
        self._held_requests: dict[int, web.Request] = {}
        self._released = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Wake long polls, stop webhook deliveries and stop listening."""
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        for task in list(self._delivery_tasks):
            task.cancel()
        await asyncio.gather(*self._delivery_tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegramServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """The value for ``ApplicationBuilder().base_url(...)`` (PTB appends the token)."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def bot_username(self) -> str:
        """The bot's ``@username`` without the ``@``."""
        return str(self.bot_user["username"])

    # --- fault injection -------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        error_code: int = 400,
        description: str = "Bad Request: injected failure",
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with an error (429 with ``retry_after`` for flood control)."""
        self._failures.append(_Failure(method, error_code, description, retry_after, times))

    def hold(self, *methods: str) -> None:
        """Keep calls of ``methods`` waiting (unanswered, unprocessed) until :meth:`release`."""
        self._holds.update(methods)
        self._released.clear()

    def release(self) -> None:
        """Let held calls through. One whose client went away meanwhile is dropped unprocessed, as Telegram drops a
        request whose connection broke before it was read: its message was never sent."""
        self._holds.clear()
        self._released.set()

    def held_connected(self, call: ApiCall) -> bool:
        """Whether the bot that made a held call is still connected (a killed replica's connections close)."""
        request = self._held_requests.get(id(call))
        transport = request.transport if request is not None else None
        return transport is not None and not transport.is_closing()

    # --- the user's side -------------------------------------------------------------------------------

    @staticmethod
    def user(user_id: int, first_name: str = "") -> JSONDict:
        """A Telegram ``User`` object for a human."""
        return {"id": user_id, "is_bot": False, "first_name": first_name or f"User{user_id}", "language_code": "en"}

    @staticmethod
    def chat(chat_id: int, chat_type: str = "private", title: str = "") -> JSONDict:
        """A Telegram ``Chat`` object (``private``, ``group`` or ``supergroup``)."""
        chat: JSONDict = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = f"User{chat_id}"
        else:
            chat["title"] = title or f"Group {chat_id}"
        return chat

    async def send_text(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        *,
        chat_type: str = "private",
        reply_to: JSONDict | None = None,
        first_name: str = "",
    ) -> JSONDict:
        """A user writes ``text``; entities for a leading ``/command`` and ``@mentions`` are added as Telegram does."""
        message: JSONDict = {
            "message_id": next(self._message_ids[chat_id]),
            "date": int(time.time()),
            "chat": self.chat(chat_id, chat_type),
            "from": self.user(user_id, first_name),
            "text": text,
        }
        entities = self._entities(text)
        if entities:
            message["entities"] = entities
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        self._messages[(chat_id, message["message_id"])] = message
        await self.push_update({"message": message})
        return message

    async def send_command(
        self,
        chat_id: int,
        user_id: int,
        name: str,
        argument: str = "",
        *,
        chat_type: str = "private",
        address_bot: bool = False,
    ) -> JSONDict:
        """A user sends ``/name argument`` (``/name@bot`` when ``address_bot``, as Telegram does in groups)."""
        command = f"/{name}@{self.bot_username}" if address_bot else f"/{name}"
        text = f"{command} {argument}".rstrip() if argument else command
        return await self.send_text(chat_id, user_id, text, chat_type=chat_type)

    async def push_update(self, payload: JSONDict) -> int:
        """Queue a raw update (``{"message": {...}}``, ...) for ``getUpdates``, or deliver it by webhook while one
        is set; returns its ``update_id``."""
        async with self._changed:
            update_id = next(self._update_ids)
            update = {"update_id": update_id, **payload}
            self.updates_by_id[update_id] = update
            if self.webhook is not None:
                self._unconfirmed[update_id] = update
                task = asyncio.create_task(self._deliver(update), name=f"webhook-{update_id}")
                self._delivery_tasks.add(task)
                task.add_done_callback(self._delivery_tasks.discard)
            else:
                self._updates.append(update)
            self._changed.notify_all()
        return update_id

    async def _deliver(self, update: JSONDict) -> None:
        """POST ``update`` to the replicas, round robin, until one answers 200."""
        assert self.webhook is not None
        headers = {}
        if self.webhook.get("secret_token"):
            headers["X-Telegram-Bot-Api-Secret-Token"] = str(self.webhook["secret_token"])
        path = urlsplit(str(self.webhook["url"])).path or "/"
        attempt = 0
        while not self._closing:
            if not self.webhook_targets:
                raise RuntimeError("a webhook is set but no webhook_targets (replicas) are given")
            target = self.webhook_targets[next(self._round_robin) % len(self.webhook_targets)]
            status: int | None
            async with self._changed:
                self.in_flight[update["update_id"]] = target
                self._changed.notify_all()
            try:
                if self._client is None:
                    self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.webhook_timeout_s))
                async with self._client.post(target.rstrip("/") + path, json=update, headers=headers) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = None
            async with self._changed:
                self.in_flight.pop(update["update_id"], None)
                self.deliveries.append(WebhookDelivery(update["update_id"], target, status))
                if status == 200:
                    self._unconfirmed.pop(update["update_id"], None)
                self._changed.notify_all()
            if status == 200:
                return
            attempt += 1
            await asyncio.sleep(min(0.02 * 2**attempt, 1.0))  # Telegram backs off between redeliveries too

    async def press_button(self, chat_id: int, user_id: int, message: JSONDict, data: str) -> str:
        """A user presses an inline button with ``data`` under ``message``; returns the callback query id."""
        query_id = str(next(self._callback_ids))
        current = self._messages.get((chat_id, message["message_id"]), message)
        await self.push_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": self.user(user_id),
                    "chat_instance": f"ci{chat_id}",
                    "message": current,
                    "data": data,
                }
            }
        )
        return query_id

    # --- what the bot did ------------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[ApiCall]:
        """Every call of ``method`` so far."""
        return [call for call in self.calls if call.method == method]

    def messages_to(self, chat_id: int) -> list[JSONDict]:
        """Every message the bot sent to ``chat_id``."""
        return [message for message in self.sent_messages if message["chat"]["id"] == chat_id]

    def message(self, chat_id: int, message_id: int) -> JSONDict:
        """The current state of a message (reply markup after edits)."""
        return self._messages[(chat_id, message_id)]

    async def next_message(self, chat_id: int, *, timeout: float = 30.0) -> JSONDict:
        """The next message the bot sends to ``chat_id`` that this helper has not returned yet."""

        def unread() -> list[JSONDict]:
            return self.messages_to(chat_id)[self._read_cursor[chat_id] :]

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: bool(unread()) or self._closing), timeout)
            pending = unread()
            if not pending:
                raise RuntimeError("server closed while waiting for a message")
            self._read_cursor[chat_id] += 1
            return pending[0]

    async def wait_for_call(
        self, method: str, predicate: Callable[[ApiCall], bool] = lambda call: True, *, timeout: float = 30.0
    ) -> ApiCall:
        """The first call of ``method`` (past or future) that satisfies ``predicate``."""

        def found() -> ApiCall | None:
            return next((call for call in self.calls_to(method) if predicate(call)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None or self._closing), timeout)
        call = found()
        if call is None:
            raise RuntimeError(f"server closed while waiting for {method}")
        return call

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 60.0) -> None:
        """Wait until ``predicate()`` holds (checked whenever a call, a message or a delivery changes something)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate() or self._closing), timeout)

    async def wait_confirmed(self, *, timeout: float = 60.0) -> None:
        """Wait until every update injected so far is confirmed (``getUpdates`` offset or a webhook's 200)."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.pending_updates() == 0 or self._closing), timeout
            )

    def pending_updates(self) -> int:
        """Updates injected but not yet confirmed by the bot (``getUpdates`` offset, or a webhook's 200)."""
        return len(self._updates) + len(self._unconfirmed)

    # --- HTTP ------------------------------------------------------------------------------------------

    def _entities(self, text: str) -> list[JSONDict]:
        entities: list[JSONDict] = []
        command = _COMMAND.match(text)
        if command:
            entities.append({"type": "bot_command", "offset": 0, "length": utf16_length(command.group())})
        for mention in _MENTION.finditer(text):
            if command and mention.start() < command.end():
                continue
            entities.append(
                {
                    "type": "mention",
                    "offset": utf16_length(text[: mention.start()]),
                    "length": utf16_length(mention.group()),
                }
            )
        return entities

    async def _record(self, call: ApiCall) -> None:
        async with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    @staticmethod
    async def _read_params(request: web.Request) -> JSONDict:
        if request.content_type == "application/json":
            body = await request.json() if request.can_read_body else {}
            return dict(body or {})
        form = await request.post()
        params: JSONDict = {}
        for key, value in form.items():
            if not isinstance(value, str):
                continue  # file uploads are not used by Reverie
            params[key] = json.loads(value) if key in _JSON_PARAMETERS else value
        return params

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    @staticmethod
    def _error(code: int, description: str, retry_after: int | None = None) -> web.Response:
        body: JSONDict = {"ok": False, "error_code": code, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.json_response(body, status=code)

    def _take_failure(self, method: str) -> _Failure | None:
        for failure in self._failures:
            if failure.method == method and failure.remaining > 0:
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        params = await self._read_params(request)
        if method in self._holds:
            call = ApiCall(method, params)
            async with self._changed:
                self.held.append(call)
                self._held_requests[id(call)] = request
                self._changed.notify_all()
            await self._released.wait()
            async with self._changed:
                self.held.remove(call)
                self._held_requests.pop(id(call), None)
            transport = request.transport
            if transport is None or transport.is_closing():
                return self._error(499, "client closed the connection")  # nobody reads this: the bot is gone
        await self._record(ApiCall(method, params))
        failure = self._take_failure(method)
        if failure is not None:
            return self._error(failure.error_code, failure.description, failure.retry_after)
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return self._error(404, "Not Found")
        try:
            return self._ok(await handler(params))
        except _ApiError as error:
            if error.code != 400:
                return self._error(error.code, str(error))
            return self._error(400, f"Bad Request: {error}")

    # --- Bot API methods -------------------------------------------------------------------------------

    async def _api_getMe(self, params: JSONDict) -> JSONDict:
        return self.bot_user

    async def _api_deleteWebhook(self, params: JSONDict) -> bool:
        self.webhook = None
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self._updates.clear()
        return True

    async def _api_setWebhook(self, params: JSONDict) -> bool:
        url = str(params.get("url") or "")
        if not url:
            return await self._api_deleteWebhook(params)
        secret = params.get("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", str(secret)):
            raise _ApiError("secret token contains unallowed characters")
        self.webhook = {"url": url, "secret_token": secret, "allowed_updates": params.get("allowed_updates")}
        # Updates that waited for getUpdates are delivered by the webhook from now on.
        waiting, self._updates = self._updates, []
        for update in waiting:
            self._unconfirmed[update["update_id"]] = update
            task = asyncio.create_task(self._deliver(update), name=f"webhook-{update['update_id']}")
            self._delivery_tasks.add(task)
            task.add_done_callback(self._delivery_tasks.discard)
        return True

    async def _api_getWebhookInfo(self, params: JSONDict) -> JSONDict:
        if self.webhook is None:
            return {"url": "", "has_custom_certificate": False, "pending_update_count": len(self._updates)}
        return {
            "url": self.webhook["url"],
            "has_custom_certificate": False,
            "pending_update_count": len(self._unconfirmed),
            "allowed_updates": self.webhook.get("allowed_updates") or [],
        }

    async def _api_getUpdates(self, params: JSONDict) -> list[JSONDict]:
        if self.webhook is not None:
            raise _ApiError("Conflict: can't use getUpdates method while webhook is active", code=409)
        offset = int(params.get("offset") or 0)
        limit = max(1, min(100, int(params.get("limit") or 100)))
        timeout = max(0.0, float(params.get("timeout") or 0))
        async with self._changed:
            if offset > 0:
                # Telegram forgets every update below the offset: they are confirmed.
                self._updates = [update for update in self._updates if update["update_id"] >= offset]
                self._changed.notify_all()
            if not self._updates and timeout > 0 and not self._closing:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: bool(self._updates) or self._closing), timeout
                    )
                except TimeoutError:
                    pass
            return list(self._updates[:limit])

    def _chat_of(self, params: JSONDict) -> JSONDict:
        try:
            chat_id = int(params["chat_id"])
        except (KeyError, ValueError) as error:
            raise _ApiError("chat not found") from error
        known = next((m["chat"] for (cid, _), m in self._messages.items() if cid == chat_id), None)
        return known or self.chat(chat_id, "private" if chat_id > 0 else "group")

    async def _api_sendMessage(self, params: JSONDict) -> JSONDict:
        chat = self._chat_of(params)
        text = str(params.get("text", ""))
        if not text.strip():
            raise _ApiError("message text is empty")
        if utf16_length(text) > 4096:
            raise _ApiError("message is too long")
        message: JSONDict = {
            "message_id": next(self._message_ids[chat["id"]]),
            "date": int(time.time()),
            "chat": chat,
            "from": self.bot_user,
            "text": text,
        }
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        reply_to = (params.get("reply_parameters") or {}).get("message_id") or params.get("reply_to_message_id")
        if reply_to and (chat["id"], int(reply_to)) in self._messages:
            message["reply_to_message"] = self._messages[(chat["id"], int(reply_to))]
        async with self._changed:
            self._messages[(chat["id"], message["message_id"])] = message
            self.sent_messages.append(message)
            self._changed.notify_all()
        return message

    async def _api_sendChatAction(self, params: JSONDict) -> bool:
        self._chat_of(params)
        if params.get("action") not in {"typing", "upload_photo", "record_voice", "upload_document"}:
            raise _ApiError("wrong parameter action in request")
        return True

    async def _api_setMyCommands(self, params: JSONDict) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _ApiError("commands must be a list")
        for command in commands:
            name = str(command.get("command", ""))
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
                raise _ApiError(f"invalid command name {name!r}")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _ApiError("command description must be 1-256 characters")
        self.commands_by_scope[json.dumps(params.get("scope") or {"type": "default"}, sort_keys=True)] = commands
        return True

    async def _api_getMyCommands(self, params: JSONDict) -> list[JSONDict]:
        return self.commands_by_scope.get(json.dumps(params.get("scope") or {"type": "default"}, sort_keys=True), [])

    async def _api_answerCallbackQuery(self, params: JSONDict) -> bool:
        if not params.get("callback_query_id"):
            raise _ApiError("query id is empty")
        if len(str(params.get("text", ""))) > 200:
            raise _ApiError("text is too long")
        return True

    async def _api_editMessageReplyMarkup(self, params: JSONDict) -> JSONDict:
        chat = self._chat_of(params)
        key = (chat["id"], int(params.get("message_id") or 0))
        if key not in self._messages:
            raise _ApiError("message to edit not found")
        message = dict(self._messages[key])
        markup = params.get("reply_markup")
        if markup == message.get("reply_markup"):
            raise _ApiError("message is not modified")
        if markup:
            message["reply_markup"] = markup
        else:
            message.pop("reply_markup", None)
        async with self._changed:
            self._messages[key] = message
            self._changed.notify_all()
        return message


class _ApiError(Exception):
    """A request the real Bot API would refuse (400 unless ``code`` says otherwise)."""

    def __init__(self, message: str, *, code: int = 400) -> None:
        super().__init__(message)
        self.code = code
