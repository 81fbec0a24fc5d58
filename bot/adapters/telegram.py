"""Telegram adapter: python-telegram-bot v22 events in, :class:`~bot.service.DialogueService` calls out.

Translation only. A text message becomes ``handle_message``, ``/name argument`` becomes ``handle_command``, a 👍/👎
press becomes ``handle_feedback``; the :class:`~bot.events.Reply` values that come back are sent as they are, with
the feedback keyboard under the last chunk of each agent turn. Everything about the conversation itself (sessions,
limits, wording of refusals, storage) lives in the service.

Platform rules handled here:

* in groups the bot answers only when @mentioned (the mention is stripped) or when a user replies to one of its
  messages; commands are answered unless addressed to another bot (``/start@other_bot``);
* updates are processed concurrently across chats but in arrival order within a chat
  (:class:`PerChatUpdateProcessor`), so replies never overtake each other;
* a typing indicator is refreshed every :data:`TYPING_INTERVAL_S` seconds while the service works;
* an error in a handler is logged (never the token) and answered with a short apology; polling goes on.

Entry point: :func:`run_telegram`, which shares the event loop with other platforms
(``async with app`` + ``updater.start_polling()``, not ``run_polling``).

Webhooks (``TELEGRAM_WEBHOOK_URL``, for several replicas behind a load balancer — Telegram lets only one process
poll): the adapter registers the webhook with its secret token at start and serves ``POST <path of the URL>`` on
the process's HTTP server (:mod:`bot.web`). Each request's ``X-Telegram-Bot-Api-Secret-Token`` is checked; the
update (``Update.de_json``) goes through the same per-chat processor and handlers as a polled one, and the request
is answered only once it was handled, so an update whose replica died mid-way is redelivered to another one.
A redelivered update stores nothing twice: its user turn and reply carry keys derived from the update id
(:func:`storage.store.handling_update`), and one whose reply is stored already gets that reply sent again rather
than a second one (a dead replica may never have sent it; Telegram shows it twice only when the replica died
between Telegram accepting the message and the webhook's 200).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    BotCommandScopeDefault,
    CallbackQuery,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
    User,
)
from telegram.constants import ChatAction, ChatType, MessageLimit
from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    BaseUpdateProcessor,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot import redaction
from bot.events import ChatRef, CommandInfo, FeedbackDataError, Reply, decode_feedback
from bot.events import encode_feedback as _encode_feedback
from bot.settings import Settings
from bot.text import split_text
from bot.web.health import ADAPTERS
from storage.store import handling_update

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from bot.service import DialogueService

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
DEFAULT_BASE_URL = "https://api.telegram.org/bot"
#: Telegram shows "typing…" for about 5 s after each ``sendChatAction``; refresh a little earlier.
TYPING_INTERVAL_S = 4.0
#: Longest toast ``answerCallbackQuery`` accepts.
TOAST_LIMIT = 200
THUMBS_UP = "👍"
THUMBS_DOWN = "👎"
CHOSEN_MARK = " ✓"
APOLOGY = "⚠️ Sorry, something went wrong on my side while handling that. Please try again in a moment."
FEEDBACK_APOLOGY = "Sorry, that did not work. Please try again."
TEXT_ONLY = "I can only read text messages. Please write to me in words."

_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
_GROUP_TYPES = frozenset({ChatType.GROUP, ChatType.SUPERGROUP})
_TEXT_LIMIT = int(MessageLimit.MAX_TEXT_LENGTH)


# --- pure translation helpers ----------------------------------------------------------------------------


def feedback_keyboard(turn_id: int, chosen: bool | None = None) -> InlineKeyboardMarkup:
    """The 👍/👎 row for an agent turn; ``chosen`` (True = 👍) marks the button that was pressed."""
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(
                    THUMBS_UP + (CHOSEN_MARK if chosen is True else ""), callback_data=_encode_feedback(turn_id, True)
                ),
                InlineKeyboardButton(
                    THUMBS_DOWN + (CHOSEN_MARK if chosen is False else ""),
                    callback_data=_encode_feedback(turn_id, False),
                ),
            ]
        ]
    )


def telegram_chunks(text: str) -> list[str]:
    """``text`` as Telegram messages, cut on natural boundaries (``split_text``) to fit the limit, which Telegram
    counts in UTF-16 units."""
    result: list[str] = []
    for chunk in split_text(text, _TEXT_LIMIT):
        if _utf16_length(chunk) <= _TEXT_LIMIT:
            result.append(chunk)
        else:
            # Half the limit in code points is always within the limit in UTF-16 units.
            result.extend(split_text(chunk, _TEXT_LIMIT // 2))
    return result


def bot_commands(commands: Sequence[CommandInfo], *, include_admin: bool) -> list[BotCommand]:
    """``CommandInfo`` as Telegram ``BotCommand`` values (names Telegram would refuse are skipped, with a warning)."""
    result: list[BotCommand] = []
    for command in commands:
        if command.admin_only and not include_admin:
            continue
        if not _COMMAND_NAME.fullmatch(command.name):
            logger.warning("Command /%s cannot be registered on Telegram (a-z, 0-9, _; 1-32 chars)", command.name)
            continue
        description = command.description.strip() or command.name
        if command.argument:
            description = f"{description} ({command.argument})"
        result.append(BotCommand(command.name, description[:256]))
    return result


def chat_ref(chat: Chat, user: User) -> ChatRef:
    """Who wrote where, in the service's terms."""
    return ChatRef(
        platform=PLATFORM,
        chat_id=str(chat.id),
        user_id=str(user.id),
        user_name=user.full_name or user.username or "",
        is_group=chat.type in _GROUP_TYPES,
    )


def parse_command(message: Message, bot_username: str) -> tuple[str, str] | None:
    """``(name, argument)`` of a ``/name[@bot] argument`` message, or None when it is addressed to another bot."""
    text = message.text or ""
    entity = next(
        (e for e in message.entities if e.type == MessageEntity.BOT_COMMAND and e.offset == 0),
        None,
    )
    token = message.parse_entity(entity) if entity is not None else text.split(maxsplit=1)[0] if text else ""
    name, _, addressee = token.lstrip("/").partition("@")
    if addressee and addressee.lower() != bot_username.lower():
        return None
    argument = text[len(token) :].strip()
    return name.lower(), argument


def addressed_text(message: Message, bot_id: int, bot_username: str) -> str | None:
    """In a group: the text without the bot's @mention when the bot is mentioned or replied to, else None."""
    text = message.text or ""
    mentions = [
        entity
        for entity, value in message.parse_entities([MessageEntity.MENTION, MessageEntity.TEXT_MENTION]).items()
        if (entity.type == MessageEntity.MENTION and value.lower() == f"@{bot_username.lower()}")
        or (entity.type == MessageEntity.TEXT_MENTION and entity.user is not None and entity.user.id == bot_id)
    ]
    replied = message.reply_to_message
    replied_to_bot = replied is not None and replied.from_user is not None and replied.from_user.id == bot_id
    if not mentions and not replied_to_bot:
        return None
    # Entity offsets count UTF-16 code units, so cut in that encoding.
    encoded = text.encode("utf-16-le")
    for entity in sorted(mentions, key=lambda e: e.offset, reverse=True):
        encoded = encoded[: entity.offset * 2] + encoded[(entity.offset + entity.length) * 2 :]
    return re.sub(r"[ \t]{2,}", " ", encoded.decode("utf-16-le")).strip()


def _utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


# --- secrets --------------------------------------------------------------------------------------------


class TokenRedactor(logging.Filter):
    """Replaces the bot token in log records (httpx logs request URLs, PTB's InvalidToken quotes the token)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token

    def redact(self, text: str) -> str:
        """``text`` with the token replaced."""
        return text.replace(self._token, "<telegram-token>") if self._token else text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._token and self._token in message:
            record.msg, record.args = self.redact(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            formatted = logging.Formatter().formatException(record.exc_info)
            if self._token and self._token in formatted:
                # Handlers render exc_info themselves; hand them redacted text instead.
                record.msg = f"{record.msg}\n{self.redact(formatted)}"
                record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _redacting_logs(token: str) -> Iterator[TokenRedactor]:
    """Install :class:`TokenRedactor` on our, PTB's and httpx's loggers for the duration.

    The token is also registered process-wide (``bot.redaction``), which scrubs records of every logger,
    including those created after this point and records that only propagate through these loggers.
    """
    redaction.REDACTOR.add(token)
    redaction.install()
    redactor = TokenRedactor(token)
    names = [
        name
        for name in list(logging.root.manager.loggerDict)
        if name.split(".")[0] in {"telegram", "httpx", "httpcore", "bot"}
    ]
    loggers = [logging.getLogger(name) for name in {*names, "telegram", "httpx", "httpcore", __name__}]
    for each in loggers:
        each.addFilter(redactor)
    try:
        yield redactor
    finally:
        for each in loggers:
            each.removeFilter(redactor)


def update_key(bot_id: int, update_id: int) -> str:
    """The key a Telegram update's turns are stored under: the same for each delivery of the update."""
    return f"{PLATFORM}:{bot_id}:{update_id}"


# --- update ordering ------------------------------------------------------------------------------------


class PerChatUpdateProcessor(BaseUpdateProcessor):
    """Processes updates of different chats concurrently, and those of one chat in arrival order.

    Button presses are not queued behind a reply that is still being generated, so their toast comes at once.
    """

    def __init__(self, max_concurrent_updates: int = 256) -> None:
        super().__init__(max_concurrent_updates)
        self._locks: dict[int, asyncio.Lock] = {}
        self._users: dict[int, int] = {}

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        """Await ``coroutine`` once every earlier update of the same chat is done."""
        key = None
        if isinstance(update, Update) and update.callback_query is None and update.effective_chat is not None:
            key = update.effective_chat.id
        if key is None:
            await coroutine
            return
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                await coroutine
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:  # forget idle chats so the dict does not grow without bound
                del self._users[key], self._locks[key]

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to tear down."""


# --- the adapter ----------------------------------------------------------------------------------------


class TelegramAdapter:
    """PTB handlers that forward to a :class:`DialogueService` and send its replies."""

    def __init__(self, service: DialogueService, settings: Settings, redactor: TokenRedactor | None = None) -> None:
        self._service = service
        self._settings = settings
        token = settings.telegram_token.get_secret_value() if settings.telegram_token else ""
        self._redactor = redactor or TokenRedactor(token)

    @property
    def settings(self) -> Settings:
        """The settings the adapter runs with."""
        return self._settings

    def build_application(self) -> Application[Any, Any, Any, Any, Any, Any]:
        """A PTB application with the adapter's handlers, rate limiter and per-chat ordering."""
        if self._settings.telegram_token is None:
            raise ValueError("TELEGRAM_TOKEN is not set")
        app = (
            ApplicationBuilder()
            .token(self._settings.telegram_token.get_secret_value())
            .base_url(self._settings.telegram_base_url or DEFAULT_BASE_URL)
            .rate_limiter(AIORateLimiter(max_retries=2))
            .concurrent_updates(PerChatUpdateProcessor())
            .job_queue(None)  # scheduling is the improvement loop's job, not PTB's
            .build()
        )
        not_edited = ~filters.UpdateType.EDITED
        app.add_handler(MessageHandler(filters.COMMAND & not_edited, self._on_command))
        app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND & not_edited, self._on_text))
        app.add_handler(
            MessageHandler(
                filters.ChatType.PRIVATE & ~filters.TEXT & ~filters.StatusUpdate.ALL & not_edited, self._on_other
            )
        )
        app.add_handler(CallbackQueryHandler(self._on_feedback))
        app.add_error_handler(self._on_error)
        return app

    async def register_commands(self, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        """``setMyCommands``: everyone's commands by default, all of them in each admin's private chat."""
        commands = self._service.commands
        try:
            await app.bot.set_my_commands(bot_commands(commands, include_admin=False), scope=BotCommandScopeDefault())
        except TelegramError as error:
            logger.warning("Could not register Telegram commands: %s", self._redactor.redact(str(error)))
            return
        admin_commands = bot_commands(commands, include_admin=True)
        for admin in self._settings.admin_ids:
            platform, _, user_id = admin.partition(":")
            if platform != PLATFORM or not user_id.lstrip("-").isdigit():
                continue
            try:
                await app.bot.set_my_commands(admin_commands, scope=BotCommandScopeChat(int(user_id)))
            except TelegramError as error:  # e.g. the admin has not opened a chat with the bot yet
                logger.info("Admin commands not shown to %s yet: %s", admin, self._redactor.redact(str(error)))

    # --- handlers -----------------------------------------------------------------------------------------

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        if message is None or user is None or user.is_bot or message.text is None:
            return
        text: str | None = message.text
        if message.chat.type in _GROUP_TYPES:
            text = addressed_text(message, context.bot.id, context.bot.username)
            if text is None:
                return  # group chatter not meant for the bot
        chat = chat_ref(message.chat, user)
        key = update_key(context.bot.id, update.update_id)
        async with self._apologising(message, "message"):
            stored = await self._service.store.update_reply(key)
            if stored is not None:
                # A redelivery: the replica that stored this reply did not confirm the update, so it may have died
                # before sending it. Send the stored reply again instead of a second, different one.
                logger.info(
                    "Telegram update %s was answered before (a redelivery): its reply sent again", update.update_id
                )
                await self._send(message, [Reply(stored.text, turn_id=stored.id)])
                return
            with handling_update(key):
                async with self._typing(message):
                    replies = await self._service.handle_message(chat, text)
            await self._send(message, replies)

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        if message is None or user is None or user.is_bot:
            return
        parsed = parse_command(message, context.bot.username)
        if parsed is None:
            return  # /command@another_bot
        name, argument = parsed
        chat = chat_ref(message.chat, user)
        async with self._apologising(message, f"/{name}"):
            async with self._typing(message):
                replies = await self._service.handle_command(chat, name, argument)
            await self._send(message, replies)

    async def _on_other(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or (update.effective_user is not None and update.effective_user.is_bot):
            return
        async with self._apologising(message, "non-text message"):
            await message.reply_text(TEXT_ONLY)

    async def _on_feedback(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        chat = query.message.chat if query.message is not None else None
        ref = (
            chat_ref(chat, query.from_user)
            if chat is not None
            else ChatRef(PLATFORM, str(query.from_user.id), str(query.from_user.id), query.from_user.full_name)
        )
        try:
            toast = await self._service.handle_feedback(ref, query.data or "")
        except Exception as error:
            self.log_error("feedback", error)
            await self._answer(query, FEEDBACK_APOLOGY)
            return
        await self._answer(query, toast)
        await self._mark_choice(query)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        # Last resort for errors outside our handlers' own guards (PTB internals); polling continues.
        if context.error is not None:
            self.log_error("update", context.error)

    # --- helpers ------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _apologising(self, message: Message, what: str) -> AsyncIterator[None]:
        """Log an error of the block and tell the user something went wrong, instead of going silent."""
        try:
            yield
        except Forbidden as error:  # blocked by the user or removed from the group: nobody to tell
            logger.info(
                "Telegram refused to deliver to chat %s: %s", message.chat_id, self._redactor.redact(str(error))
            )
        except Exception as error:
            self.log_error(what, error)
            with contextlib.suppress(TelegramError):
                await message.get_bot().send_message(message.chat_id, APOLOGY, reply_parameters=self._reply_to(message))

    def log_error(self, what: str, error: BaseException) -> None:
        """Log a failure without the token: a warning for Telegram errors, a traceback for our own."""
        if isinstance(error, NetworkError | TelegramError):
            logger.warning("Telegram %s failed: %s", what, self._redactor.redact(f"{type(error).__name__}: {error}"))
        else:
            logger.error(
                "Handling a Telegram %s failed: %s",
                what,
                self._redactor.redact(f"{type(error).__name__}: {error}"),
                exc_info=error,
            )

    @contextlib.asynccontextmanager
    async def _typing(self, message: Message) -> AsyncIterator[None]:
        """Show "typing…" in the chat until the block ends."""
        task = asyncio.create_task(self._keep_typing(message))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep_typing(self, message: Message) -> None:
        bot = message.get_bot()
        while True:
            try:
                await bot.send_chat_action(message.chat_id, ChatAction.TYPING)
            except TelegramError as error:  # cosmetic: never let it fail the turn
                logger.debug("typing indicator failed: %s", self._redactor.redact(str(error)))
            await asyncio.sleep(TYPING_INTERVAL_S)

    @staticmethod
    def _reply_to(message: Message) -> ReplyParameters | None:
        # In groups answer as a reply, so it is clear whom the bot answers (and they can reply back).
        if message.chat.type in _GROUP_TYPES:
            return ReplyParameters(message.message_id, allow_sending_without_reply=True)
        return None

    async def _send(self, message: Message, replies: Sequence[Reply]) -> None:
        """Send each reply's chunks in order; the feedback keyboard goes under the last chunk of an agent turn."""
        bot = message.get_bot()
        reply_to = self._reply_to(message)
        for reply in replies:
            chunks = telegram_chunks(reply.text)
            for index, chunk in enumerate(chunks):
                last = index == len(chunks) - 1
                markup = feedback_keyboard(reply.turn_id) if last and reply.turn_id is not None else None
                await bot.send_message(
                    message.chat_id,
                    chunk,
                    reply_markup=markup,
                    reply_parameters=reply_to if index == 0 else None,
                )

    async def _answer(self, query: CallbackQuery, toast: str) -> None:
        try:
            await query.answer(toast[:TOAST_LIMIT] if toast else None)
        except TelegramError as error:  # too old (>15 min) or already answered
            logger.info("Could not answer a button press: %s", self._redactor.redact(str(error)))

    async def _mark_choice(self, query: CallbackQuery) -> None:
        """Mark the pressed button (✓) when it is a genuine button of this message pressed by its addressee."""
        message = query.message
        if not isinstance(message, Message) or message.reply_markup is None:
            return
        try:
            turn_id, thumbs_up = decode_feedback(query.data)
        except FeedbackDataError:
            return
        buttons = {button.callback_data for row in message.reply_markup.inline_keyboard for button in row}
        if query.data not in buttons:
            return  # data that this message never offered
        if message.chat.type in _GROUP_TYPES:
            addressee = message.reply_to_message.from_user if message.reply_to_message else None
            if addressee is None or addressee.id != query.from_user.id:
                return  # someone else's turn: the service refused it
        elif message.chat.id != query.from_user.id:
            return
        with contextlib.suppress(BadRequest):  # "message is not modified" on a repeated press
            await query.edit_message_reply_markup(feedback_keyboard(turn_id, thumbs_up))


# --- entry point ----------------------------------------------------------------------------------------


async def run_telegram(
    service: DialogueService,
    settings: Settings,
    stop: asyncio.Event,
    *,
    poll_timeout_s: float = 10.0,
    retry_delay_s: float = 5.0,
) -> None:
    """Serve Telegram until ``stop`` is set, then stop cleanly (handlers in flight finish first).

    Runs on the caller's event loop next to other platforms. If Telegram cannot be reached at start it retries
    after ``retry_delay_s`` (doubling up to a minute, or as long as flood control asks); a rejected token is
    logged and ends this adapter only, never the other platforms.
    """
    if settings.telegram_token is None:
        logger.info("Telegram is off: TELEGRAM_TOKEN is not set")
        return
    token = settings.telegram_token.get_secret_value()
    with _redacting_logs(token) as redactor:
        adapter = TelegramAdapter(service, settings, redactor)
        delay = retry_delay_s
        while not stop.is_set():
            app = adapter.build_application()
            try:
                async with app:
                    await _serve(app, adapter, stop, poll_timeout_s)
                return
            except InvalidToken:
                logger.error("Telegram rejected the bot token; the Telegram adapter is off")
                return
            except TelegramError as error:  # unreachable, 5xx, flood control: none of them is final
                wait = _retry_after_s(error) or delay
                logger.warning("Telegram not ready (%s); retrying in %.1f s", redactor.redact(str(error)), wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                delay = min(delay * 2, 60.0)


def _retry_after_s(error: TelegramError) -> float | None:
    """Seconds Telegram asked us to wait (flood control), if it did."""
    if isinstance(error, RetryAfter):
        retry_after = error.retry_after
        return retry_after.total_seconds() if hasattr(retry_after, "total_seconds") else float(retry_after)
    return None


async def _serve(
    app: Application[Any, Any, Any, Any, Any, Any], adapter: TelegramAdapter, stop: asyncio.Event, poll_timeout_s: float
) -> None:
    await adapter.register_commands(app)
    await app.start()
    if adapter.settings.telegram_webhook_url:
        try:
            await _serve_webhook(app, adapter, stop)
        finally:
            if app.running:
                await app.stop()
            logger.info("Telegram adapter stopped")
        return
    try:
        assert app.updater is not None  # ApplicationBuilder always makes one unless told not to
        await app.updater.start_polling(
            timeout=poll_timeout_s,
            allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY],
            error_callback=lambda error: adapter.log_error("polling", error),
        )
        logger.info("Telegram adapter polling as @%s", app.bot.username)
        ADAPTERS.connected(PLATFORM)
        try:
            await stop.wait()
        finally:
            ADAPTERS.disconnected(PLATFORM)
            if app.updater.running:
                await app.updater.stop()
    finally:
        if app.running:
            await app.stop()  # waits for handlers in flight
        logger.info("Telegram adapter stopped")


# --- webhooks -------------------------------------------------------------------------------------------

#: The header Telegram sends the webhook's secret token in.
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def webhook_path(url: str) -> str:
    """The route a webhook URL's requests arrive on (behind the load balancer): its path, ``/telegram`` if none."""
    from urllib.parse import urlsplit

    return urlsplit(url).path.rstrip("/") or "/telegram"


def webhook_handler(
    app: Application[Any, Any, Any, Any, Any, Any], secret: str, stop: asyncio.Event
) -> Callable[[Request], Awaitable[Response]]:
    """The ``POST`` handler of the webhook route: secret checked, update handled, then answered.

    403 without the right secret token (compared in constant time); 400 for a body that is no update; 503 while
    the process stops (Telegram delivers it again, to a replica that is up); 200 once the update was handled —
    its replies sent — so a replica that dies mid-way leaves the update unconfirmed, and it is redelivered.
    """
    from starlette.responses import PlainTextResponse

    expected = secret.encode()

    async def handle(request: Request) -> Response:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, expected):
            logger.warning("Telegram webhook request without the right secret token refused")
            return PlainTextResponse("forbidden\n", status_code=403)
        if stop.is_set():
            return PlainTextResponse("stopping\n", status_code=503)
        try:
            data = json.loads(await request.body())
            update = Update.de_json(data, app.bot)
        except Exception as error:  # not JSON, or not an update
            logger.warning("Telegram webhook: not an update (%s)", type(error).__name__)
            return PlainTextResponse("bad request\n", status_code=400)
        if update is None:
            return PlainTextResponse("bad request\n", status_code=400)
        # The same ordering and concurrency as polled updates; handler errors go to the error handler.
        await app.update_processor.process_update(update, app.process_update(update))
        return PlainTextResponse("ok\n")

    return handle


async def _serve_webhook(
    app: Application[Any, Any, Any, Any, Any, Any], adapter: TelegramAdapter, stop: asyncio.Event
) -> None:
    """Register the webhook with Telegram and serve its route on the HTTP server until ``stop``."""
    from bot.web.app import WEBHOOKS

    settings = adapter.settings
    assert settings.telegram_webhook_url is not None and settings.telegram_webhook_secret is not None
    secret = settings.telegram_webhook_secret.get_secret_value()
    redaction.REDACTOR.add(secret)
    path = webhook_path(settings.telegram_webhook_url)
    WEBHOOKS.register(path, webhook_handler(app, secret, stop))
    try:
        # Every replica registers the same URL: idempotent. Pending updates are kept (delivered by webhook).
        await app.bot.set_webhook(
            settings.telegram_webhook_url,
            secret_token=secret,
            allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY],
            drop_pending_updates=False,
        )
        logger.info("Telegram adapter on webhooks as @%s (route %s)", app.bot.username, path)
        ADAPTERS.connected(PLATFORM)
        try:
            await stop.wait()
        finally:
            ADAPTERS.disconnected(PLATFORM)
    finally:
        # The webhook stays registered with Telegram: the other replicas serve it. Requests arriving now get 404
        # (or 503 while stopping) and are delivered again.
        WEBHOOKS.unregister(path)
