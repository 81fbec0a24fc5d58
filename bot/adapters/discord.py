"""Discord adapter: translates discord.py events into :class:`~bot.service.DialogueService` calls.

Nothing here decides what to say. The adapter

* registers the service's commands as slash commands (``app_commands``), synced to ``discord_guild_id`` when set
  (instant) or globally (may take up to an hour to appear);
* answers plain messages in DMs and when the bot is mentioned, so the privileged message-content intent is not
  needed (Discord still delivers the content of DMs and mentions);
* attaches 👍/👎 buttons to each agent reply as :class:`FeedbackButton` (a ``DynamicItem``), so clicks work after a
  restart without any stored view;
* acknowledges interactions within Discord's 3-second window: when the service has not answered after
  :data:`DEFER_AFTER_S`, the interaction is deferred ("thinking…") and answered with follow-ups.

Sharding: with ``DISCORD_SHARD_COUNT`` (and ``DISCORD_SHARD_IDS`` per replica) the client is discord.py's
``AutoShardedClient`` running just those shards, so each replica serves its shards' guilds (Discord routes a guild's
events to shard ``(guild_id >> 22) % count``) and the replica with shard 0 also the DMs; only that replica syncs the
slash commands, so they are registered once.

Start it with :func:`run_discord`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

import aiohttp
import discord
from discord import app_commands

from bot.events import FEEDBACK_TEMPLATE, ChatRef, CommandInfo, Reply, encode_feedback
from bot.inflight import InFlight
from bot.settings import Settings
from bot.text import split_text
from bot.web.health import ADAPTERS

if TYPE_CHECKING:
    from bot.service import DialogueService

_log = logging.getLogger(__name__)

PLATFORM = "discord"
#: Longest message Discord accepts.
TEXT_LIMIT = 2000
#: Discord drops an interaction not acknowledged within 3 s; defer when the service takes longer than this.
DEFER_AFTER_S = 2.0
#: What a user sees when handling their event failed (details go to the log).
ERROR_TEXT = "Sorry, something went wrong on my side and I could not answer that. Please try again in a moment."
#: Answer to an interaction for which the service had nothing to say (Discord requires some response).
EMPTY_ANSWER_TEXT = "Done."
#: Sent (best effort) when Discord refused part of a reply.
SEND_FAILED_TEXT = "Sorry, Discord did not accept my reply, so you may have missed part of it. Please try again."
#: Answer to a slash command Discord still shows but this version of the bot no longer has.
STALE_COMMAND_TEXT = "That command is not available (any more). Type / to see the current ones, or use /help."

_FEEDBACK_PATTERN = re.compile(FEEDBACK_TEMPLATE)
_RANGE_ARGUMENT = re.compile(r"^\[?(-?\d+)\s*-\s*(-?\d+)\]?$")
_WORD_ARGUMENT = re.compile(r"^\[?([a-z][a-z0-9_-]{0,31})\]?$")

CommandRunner = Callable[[discord.Interaction, str, str], Awaitable[None]]


# --- translation helpers ---------------------------------------------------------------------------


def chat_from_interaction(interaction: discord.Interaction) -> ChatRef:
    """The :class:`ChatRef` of whoever triggered ``interaction`` where they did it."""
    return ChatRef(
        platform=PLATFORM,
        chat_id=str(interaction.channel_id),
        user_id=str(interaction.user.id),
        user_name=interaction.user.display_name,
        is_group=interaction.guild_id is not None,
    )


def chat_from_message(message: discord.Message) -> ChatRef:
    """The :class:`ChatRef` of a message's author in its channel."""
    return ChatRef(
        platform=PLATFORM,
        chat_id=str(message.channel.id),
        user_id=str(message.author.id),
        user_name=message.author.display_name,
        is_group=message.guild is not None,
    )


def strip_mention(content: str, bot_id: int) -> str:
    """``content`` without mentions of the bot (``<@id>`` and the legacy ``<@!id>``), trimmed."""
    return re.sub(rf"<@!?{bot_id}>", " ", content).strip()


def discord_chunks(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """``text`` as Discord messages of at most ``limit`` characters, cut on natural boundaries (``split_text``)."""
    return list(split_text(text, limit))


@contextlib.asynccontextmanager
async def typing_in(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show "typing…" in ``channel`` while the body runs; a refused typing call never blocks the reply."""
    typing = channel.typing()
    try:
        await typing.__aenter__()
    except discord.HTTPException as error:
        _log.warning("Discord: typing indicator refused (%s %s); answering without it", error.status, error.text)
        yield
        return
    try:
        yield
    finally:
        await typing.__aexit__(None, None, None)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One Discord message to send: a chunk of a :class:`Reply`, with buttons on the reply's last chunk."""

    text: str
    private: bool
    turn_id: int | None  # set on the last chunk of an agent reply: gets 👍/👎

    def view(self) -> discord.ui.View | None:
        """The 👍/👎 buttons for this message, if it shows an agent turn."""
        return feedback_view(self.turn_id) if self.turn_id is not None else None


def outgoing_messages(replies: list[Reply]) -> list[OutgoingMessage]:
    """Flatten replies into Discord messages, buttons on the last chunk of each agent reply."""
    messages: list[OutgoingMessage] = []
    for reply in replies:
        pieces = discord_chunks(reply.text)
        for index, piece in enumerate(pieces):
            is_last = index == len(pieces) - 1
            messages.append(OutgoingMessage(piece, reply.private, reply.turn_id if is_last else None))
    return messages


# --- feedback buttons ------------------------------------------------------------------------------


class FeedbackButton(discord.ui.DynamicItem[discord.ui.Button], template=FEEDBACK_TEMPLATE):
    """A 👍 or 👎 button for one agent turn; its custom id carries all its state, so it survives restarts."""

    def __init__(self, turn_id: int, thumbs_up: bool) -> None:
        super().__init__(
            discord.ui.Button(
                emoji="👍" if thumbs_up else "👎",
                style=discord.ButtonStyle.secondary,
                custom_id=encode_feedback(turn_id, thumbs_up),
            )
        )
        self.turn_id = turn_id
        self.thumbs_up = thumbs_up

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> FeedbackButton:
        """Rebuild the button from a click on any message (also one sent before a restart)."""
        return cls(int(match["turn_id"]), match["vote"] == "up")

    async def callback(self, interaction: discord.Interaction) -> None:
        """Record the vote through the service and show its toast to the clicker only."""
        client = interaction.client
        if isinstance(client, ReverieDiscordClient):
            await client.answer_feedback(interaction, self.custom_id)


def feedback_view(turn_id: int) -> discord.ui.View:
    """A view with the 👍 and 👎 buttons for ``turn_id`` (no timeout: the buttons are handled dynamically)."""
    view = discord.ui.View(timeout=None)
    view.add_item(FeedbackButton(turn_id, True))
    view.add_item(FeedbackButton(turn_id, False))
    return view


# --- slash commands --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlashOption:
    """How a :class:`CommandInfo` argument becomes one slash-command option."""

    name: str
    annotation: Any
    description: str
    required: bool


def slash_option(info: CommandInfo) -> SlashOption | None:
    """The option for ``info.argument``, ``None`` without one.

    ``"a-b"`` → an integer from a to b (required, like ``/rate 1-5``); choices (``info.choices`` or ``"x|y"``) →
    string choices (optional, like ``/end [good|bad]``); a word like ``"text"`` → required free text under that
    name. An argument written in brackets (``"[text]"``) is optional.
    """
    argument = (info.argument or "").strip()
    optional = argument.startswith("[")
    if range_match := _RANGE_ARGUMENT.fullmatch(argument):
        low, high = int(range_match.group(1)), int(range_match.group(2))
        ranged = app_commands.Range[int, low, high]
        return SlashOption("score", Optional[ranged] if optional else ranged, f"{low} to {high}", not optional)  # noqa: UP045
    choices = info.choices or tuple(part.strip() for part in argument.strip("[]").split("|") if part.strip())
    if len(choices) > 1 or info.choices:
        literal = Literal.__getitem__(tuple(choices))  # Literal[...] becomes Discord string choices
        return SlashOption("choice", Optional[literal], "One of: " + ", ".join(choices), required=False)  # noqa: UP045
    if not argument:
        return None
    word = _WORD_ARGUMENT.fullmatch(argument)
    name = word.group(1).replace("-", "_") if word else "text"
    return SlashOption(name, Optional[str] if optional else str, argument.strip("[]")[:100], not optional)  # noqa: UP045


def build_slash_command(info: CommandInfo, run: CommandRunner) -> app_commands.Command:
    """A slash command for ``info`` whose callback calls ``run(interaction, name, argument_text)``."""
    option = slash_option(info)

    async def callback(interaction: discord.Interaction, **options: Any) -> None:
        value = options.get(option.name) if option else None
        await run(interaction, info.name, "" if value is None else str(value))

    # app_commands reads the options from the callback's signature; build it from the CommandInfo.
    parameters = [
        inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
    ]
    if option is not None:
        parameters.append(
            inspect.Parameter(
                option.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=option.annotation,
                default=inspect.Parameter.empty if option.required else None,
            )
        )
        callback.__discord_app_commands_param_description__ = {option.name: option.description}  # type: ignore[attr-defined]
    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    description = (info.description or info.name)[:100]
    return app_commands.Command(name=info.name, description=description, callback=callback)


# --- the client ------------------------------------------------------------------------------------


class ReverieDiscordClient(discord.Client):
    """A discord.py client that serves one :class:`DialogueService`."""

    def __init__(
        self, service: DialogueService, settings: Settings, *, defer_after_s: float = DEFER_AFTER_S, **options: Any
    ) -> None:
        intents = discord.Intents.default()
        intents.message_content = False  # privileged; DMs and mentions carry content without it
        # The model's text must never ping @everyone, roles or users.
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none(), **options)
        self.service = service
        self.settings = settings
        self.defer_after_s = defer_after_s
        self.command_guild = discord.Object(id=settings.discord_guild_id) if settings.discord_guild_id else None
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_app_command_error  # type: ignore[method-assign]
        self._command_names = {info.name for info in service.commands}
        self._in_flight = InFlight()
        for info in service.commands:
            self.tree.add_command(build_slash_command(info, self.answer_command), guild=self.command_guild)

    async def setup_hook(self) -> None:
        """Listen for feedback buttons of any message and register the slash commands."""
        self.add_dynamic_items(FeedbackButton)
        where = f"guild {self.command_guild.id}" if self.command_guild else "all guilds (global, may take a while)"
        if not syncs_commands(self.settings):
            _log.info("Discord: slash commands are synced by the replica with shard 0, not this one")
            return
        try:
            synced = await self.tree.sync(guild=self.command_guild)
        except discord.HTTPException as error:
            # Without synced commands the bot still answers DMs and mentions; say what to fix.
            _log.error(
                "Discord: could not register slash commands for %s (%s %s); "
                "is the bot invited with the applications.commands scope?",
                where,
                error.status,
                error.text,
            )
        else:
            _log.info("Discord: %d slash commands registered for %s", len(synced), where)

    async def wait_for_handlers(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until no event is being answered."""
        try:
            await asyncio.wait_for(self._in_flight.idle(), timeout)
        except TimeoutError:
            _log.warning(
                "Discord: %d event(s) still being answered after %.0f s; stopping anyway",
                self._in_flight.count,
                timeout,
            )

    async def on_ready(self) -> None:
        """Log who we are connected as; the process is ready for Discord (``/readyz``)."""
        ADAPTERS.connected("discord")
        _log.info(
            "Discord: connected as %s (%s) in %d guild(s)", self.user, self.user and self.user.id, len(self.guilds)
        )

    # --- plain messages ---------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        """Answer DMs and messages that mention the bot; ignore everything else (and other bots)."""
        me = self.user
        if me is None or message.author.bot or message.author.id == me.id:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # joins, pins, calls, …: nothing a user said
        is_dm = message.guild is None
        if not is_dm and not any(user.id == me.id for user in message.mentions):
            return
        text = strip_mention(message.content, me.id)
        chat = chat_from_message(message)
        with self._in_flight.track():
            try:
                async with typing_in(message.channel):
                    replies = await self._replies_for_text(chat, text)
            except Exception:
                _log.exception("Discord: handling a message in channel %s failed", message.channel.id)
                replies = [Reply(text=ERROR_TEXT, is_error=True)]
            await self._send_to_channel(message, replies)

    async def _replies_for_text(self, chat: ChatRef, text: str) -> list[Reply]:
        # Typed "/name arg" (e.g. in a DM where slash commands are not synced) runs the command too.
        if text.startswith("/"):
            name, _, argument = text[1:].partition(" ")
            if name.lower() in self._command_names:
                return await self.service.handle_command(chat, name.lower(), argument.strip())
        return await self.service.handle_message(chat, text)

    async def _send_to_channel(self, message: discord.Message, replies: list[Reply]) -> None:
        for index, outgoing in enumerate(outgoing_messages(replies)):
            kwargs: dict[str, Any] = {}
            if view := outgoing.view():
                kwargs["view"] = view
            if index == 0 and message.guild is not None:
                # In a busy channel, show which message is being answered (without pinging its author).
                kwargs["reference"] = message.to_reference(fail_if_not_exists=False)
            try:
                await message.channel.send(outgoing.text, **kwargs)
            except discord.HTTPException as error:
                _log.error("Discord: sending to channel %s failed: %s %s", message.channel.id, error.status, error.text)
                with contextlib.suppress(discord.HTTPException):
                    await message.channel.send(SEND_FAILED_TEXT)
                return

    # --- interactions -----------------------------------------------------------------------------

    async def answer_command(self, interaction: discord.Interaction, name: str, argument: str) -> None:
        """Run ``/name argument`` through the service and answer the interaction."""
        chat = chat_from_interaction(interaction)
        with self._in_flight.track():
            await self._answer(interaction, self.service.handle_command(chat, name, argument), defer_ephemeral=False)

    async def answer_feedback(self, interaction: discord.Interaction, data: str) -> None:
        """Pass a button click's data to the service; the toast goes to the clicker only."""
        chat = chat_from_interaction(interaction)

        async def toast() -> list[Reply]:
            return [Reply(text=await self.service.handle_feedback(chat, data), private=True)]

        with self._in_flight.track():
            await self._answer(interaction, toast(), defer_ephemeral=True)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Answer clicks on components that are not our feedback buttons (forged or stale ids) clearly."""
        if interaction.type is not discord.InteractionType.component:
            return
        custom_id = str((interaction.data or {}).get("custom_id", ""))
        if _FEEDBACK_PATTERN.fullmatch(custom_id) is None:
            await self.answer_feedback(interaction, custom_id)

    async def _answer(
        self, interaction: discord.Interaction, work: Coroutine[Any, Any, list[Reply]], *, defer_ephemeral: bool
    ) -> None:
        task = asyncio.ensure_future(work)
        deferred = False
        done, _ = await asyncio.wait({task}, timeout=self.defer_after_s)
        if not done:
            try:
                await interaction.response.defer(thinking=True, ephemeral=defer_ephemeral)
                deferred = True
            except discord.HTTPException as error:
                # Too late (Discord gave up on it) or refused: the service still finishes, so nothing is lost.
                _log.warning("Discord: could not defer interaction %s: %s %s", interaction.id, error.status, error.text)
        try:
            replies = await task
        except Exception:
            _log.exception("Discord: handling interaction %s failed", interaction.id)
            replies = [Reply(text=ERROR_TEXT, private=True, is_error=True)]
        try:
            await self._send_interaction_replies(
                interaction, replies, deferred=deferred, deferred_ephemeral=defer_ephemeral
            )
        except discord.HTTPException as error:
            _log.error("Discord: answering interaction %s failed: %s %s", interaction.id, error.status, error.text)
            if interaction.response.is_done():  # acknowledged, so a follow-up can still explain
                with contextlib.suppress(discord.HTTPException):
                    await interaction.followup.send(SEND_FAILED_TEXT, ephemeral=True)

    async def _send_interaction_replies(
        self, interaction: discord.Interaction, replies: list[Reply], *, deferred: bool, deferred_ephemeral: bool
    ) -> None:
        messages = outgoing_messages(replies) or [OutgoingMessage(EMPTY_ANSWER_TEXT, True, None)]
        first, rest = messages[0], messages[1:]
        first_view = first.view()
        if not interaction.response.is_done():
            kwargs: dict[str, Any] = {"ephemeral": first.private}
            if first_view is not None:
                kwargs["view"] = first_view
            await interaction.response.send_message(first.text, **kwargs)
        elif deferred and first.private == deferred_ephemeral:
            # The "thinking…" message becomes the first answer.
            await interaction.edit_original_response(content=first.text, view=first_view)
        else:
            # The deferred message's visibility was fixed when deferring: replace it.
            if deferred:
                await interaction.delete_original_response()
            rest = [first, *rest]
        for outgoing in rest:
            kwargs = {"ephemeral": outgoing.private}
            if view := outgoing.view():
                kwargs["view"] = view
            await interaction.followup.send(outgoing.text, **kwargs)

    async def _on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Errors raised around a slash command (bad option values, our callback): log, answer clearly."""
        original = getattr(error, "original", error)
        if isinstance(error, app_commands.CommandNotFound):
            _log.warning("Discord: unknown slash command %s (registered by an older version?)", error.name)
            text = STALE_COMMAND_TEXT
        elif isinstance(error, app_commands.TransformerError):
            _log.warning("Discord: refused interaction %s: %s", interaction.id, error)
            text = f"I could not use that value: {error}"
        else:
            _log.error("Discord: slash command failed", exc_info=original)
            text = ERROR_TEXT
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as send_error:
            _log.error("Discord: could not report an error to interaction %s: %s", interaction.id, send_error.status)


class ShardedReverieDiscordClient(ReverieDiscordClient, discord.AutoShardedClient):
    """:class:`ReverieDiscordClient` on discord.py's ``AutoShardedClient``: one gateway session per shard."""


def syncs_commands(settings: Settings) -> bool:
    """Whether this replica registers the slash commands: unsharded, or running shard 0 (so it happens once)."""
    return not settings.discord_shard_ids or 0 in settings.discord_shard_ids


def make_client(
    service: DialogueService, settings: Settings, *, defer_after_s: float = DEFER_AFTER_S
) -> ReverieDiscordClient:
    """The client for these settings: sharded when ``DISCORD_SHARD_COUNT`` is set (this replica's
    ``DISCORD_SHARD_IDS``, or all shards), else one gateway session."""
    if settings.discord_shard_count is None:
        return ReverieDiscordClient(service, settings, defer_after_s=defer_after_s)
    return ShardedReverieDiscordClient(
        service,
        settings,
        defer_after_s=defer_after_s,
        shard_count=settings.discord_shard_count,
        shard_ids=list(settings.discord_shard_ids) or None,
    )


# --- entry point -----------------------------------------------------------------------------------


async def run_discord(
    service: DialogueService,
    settings: Settings,
    stop: asyncio.Event,
    *,
    defer_after_s: float = DEFER_AFTER_S,
    retry_delay_s: float = 5.0,
    stop_grace_s: float = 30.0,
) -> None:
    """Serve ``service`` on Discord until ``stop`` is set, then close the connection cleanly.

    Runs on the caller's event loop next to other platforms and never takes them down: without
    ``discord_token`` it returns at once; a rejected token is logged and ends this adapter only; while Discord
    cannot be reached it retries every ``retry_delay_s`` (doubling up to a minute). On stop, replies in flight
    get ``stop_grace_s`` to finish. ``defer_after_s``: how long an interaction waits for the service before it
    is deferred ("thinking…").
    """
    if settings.discord_token is None:
        _log.info("Discord is off: DISCORD_TOKEN is not set")
        return
    token = settings.discord_token.get_secret_value()
    delay = retry_delay_s
    while not stop.is_set():
        client = make_client(service, settings, defer_after_s=defer_after_s)
        try:
            await _serve(client, token, stop, stop_grace_s)
            break
        except discord.LoginFailure:
            _log.error("Discord rejected the bot token; the Discord adapter is off")
            return
        except discord.ConnectionClosed as error:
            if error.code == 4004:  # the gateway's "authentication failed"
                _log.error("Discord rejected the bot token; the Discord adapter is off")
                return
            _log.error("Discord closed the connection (code %s); the Discord adapter is off", error.code)
            return
        except (OSError, TimeoutError, aiohttp.ClientError, discord.HTTPException, discord.GatewayNotFound) as error:
            _log.warning("Discord unreachable (%s: %s); retrying in %.0f s", type(error).__name__, error, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 60.0)
    _log.info("Discord adapter stopped")


async def _serve(client: ReverieDiscordClient, token: str, stop: asyncio.Event, stop_grace_s: float) -> None:
    """Run ``client`` until ``stop`` (then let handlers finish) or until it fails (then raise why)."""
    runner = asyncio.create_task(client.start(token), name="discord-client")
    stopper = asyncio.create_task(stop.wait(), name="discord-stop")
    try:
        await _run_until(client, runner, stopper, stop_grace_s)
    finally:
        ADAPTERS.disconnected("discord")


async def _run_until(
    client: ReverieDiscordClient, runner: asyncio.Task[None], stopper: asyncio.Task[bool], stop_grace_s: float
) -> None:
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()  # raises what ended the client
            return
        await client.wait_for_handlers(stop_grace_s)
    finally:
        stopper.cancel()
        if not client.is_closed():
            await client.close()
        # After close() the client's connect loop ends by itself; cancel it only if it hangs.
        await asyncio.wait({runner}, timeout=10)
        if not runner.done():
            runner.cancel()
        elif not runner.cancelled():
            runner.exception()  # retrieved here so asyncio does not report it again
