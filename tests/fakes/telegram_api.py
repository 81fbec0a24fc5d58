"""A fake Telegram Bot API server (aiohttp on 127.0.0.1, port 0) for driving the real python-telegram-bot.

It implements the methods Reverie's adapter uses (``getMe``, ``getUpdates`` with offset and long-poll timeout,
``sendMessage``, ``sendChatAction``, ``setMyCommands``, ``getMyCommands``, ``answerCallbackQuery``,
``editMessageReplyMarkup``, ``deleteWebhook``), records every call, and offers helpers to play the user's side:
inject a text message, a command or a button press, and await what the bot sent.

Point an application at it with ``ApplicationBuilder().token(server.token).base_url(server.base_url)``.
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
        """Wake long polls and stop listening."""
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
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
        """Queue a raw update (``{"message": {...}}``, ...) for ``getUpdates``; returns its ``update_id``."""
        async with self._changed:
            update_id = next(self._update_ids)
            self._updates.append({"update_id": update_id, **payload})
            self._changed.notify_all()
        return update_id

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

    def pending_updates(self) -> int:
        """Updates injected but not yet confirmed by the bot (``getUpdates`` offset)."""
        return len(self._updates)

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
            return self._error(400, f"Bad Request: {error}")

    # --- Bot API methods -------------------------------------------------------------------------------

    async def _api_getMe(self, params: JSONDict) -> JSONDict:
        return self.bot_user

    async def _api_deleteWebhook(self, params: JSONDict) -> bool:
        return True

    async def _api_getUpdates(self, params: JSONDict) -> list[JSONDict]:
        offset = int(params.get("offset") or 0)
        limit = max(1, min(100, int(params.get("limit") or 100)))
        timeout = max(0.0, float(params.get("timeout") or 0))
        async with self._changed:
            if offset > 0:
                # Telegram forgets every update below the offset: they are confirmed.
                self._updates = [update for update in self._updates if update["update_id"] >= offset]
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
    """A request the real Bot API would refuse with 400."""
