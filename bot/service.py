"""The dialogue service: the one place conversation logic lives, the same for every platform.

Adapters turn platform events into :meth:`DialogueService.handle_message`, :meth:`~DialogueService.handle_command`
and :meth:`~DialogueService.handle_feedback` calls and send back the :class:`~bot.events.Reply` values.
Everything worth keeping (conversations, turns with policy version and latency, feedback, rewards) goes to
the database as it happens; the in-memory sessions only cache it and keep each user's turns in order.
No handler raises: a failing policy or database becomes an apology, and the session keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import storage
from bot import redaction
from bot.events import (
    ChatRef,
    CommandInfo,
    FeedbackDataError,
    Improver,
    Reply,
    decode_feedback,
)
from bot.forgetting import purge_forgotten
from bot.inflight import InFlight
from bot.policy_holder import PolicyHolder
from bot.reply_guard import ReplyGuard
from bot.sessions import Session, SessionKey, history_window
from bot.settings import Settings
from bot.text import sanitize
from imagine.task import TaskSpec
from learning.interface import Message
from storage import ConversationStatus, FeedbackKind, Role, Source, Store, StoreError

logger = logging.getLogger(__name__)

#: Longest wait for one policy reply before the user gets an apology instead.
POLICY_TIMEOUT_S = 120.0

COMMANDS: tuple[CommandInfo, ...] = (
    CommandInfo("start", "Start a new conversation"),
    CommandInfo("help", "What I do and how to give feedback"),
    CommandInfo("reset", "Drop this conversation and start over"),
    CommandInfo("end", "End the conversation: was it good or bad?", argument="good|bad", choices=("good", "bad")),
    CommandInfo("rate", "Rate the conversation from 1 to 5", argument="1-5", choices=("1", "2", "3", "4", "5")),
    CommandInfo("feedback", "Tell the developers anything", argument="text"),
    CommandInfo("forget", "Delete all your conversations and feedback"),
    CommandInfo("status", "Admin: active policy, metrics, last training run", admin_only=True),
    CommandInfo("retrain", "Admin: start an improvement run now", admin_only=True),
    CommandInfo("rollback", "Admin: go back to the previous policy", admin_only=True),
)

POLICY_APOLOGY = "Sorry, I couldn't come up with a reply just now. Your message is saved; please try again."
STORAGE_APOLOGY = "Sorry, I couldn't save that just now (a problem on my side). Please try again in a moment."
SHUTTING_DOWN = "I'm restarting right now. Please send that again in a minute."
NO_IMPROVER = "The improvement loop is not running in this process, so there is nothing to {what}."

CommandHandler = Callable[[ChatRef, str], Awaitable[list[Reply]]]


class DialogueService:
    """Sessions, turns, commands and feedback for every platform."""

    def __init__(
        self,
        *,
        store: Store,
        policies: PolicyHolder,
        task: TaskSpec,
        settings: Settings,
        improver: Improver | None = None,
        clock: Callable[[], datetime] = storage.utcnow,
    ) -> None:
        self.store = store
        self.policies = policies
        self.task = task
        #: The last look at every reply: no degenerate text, no question the user already answered.
        self.guard = ReplyGuard(task)
        self.settings = settings
        self.improver = improver
        self.clock = clock
        redaction.protect(settings)  # replies and log lines of this service never carry a configured secret
        #: Seconds a policy may take for one reply (tests shorten it).
        self.policy_timeout_s = POLICY_TIMEOUT_S
        self._sessions: dict[SessionKey, Session] = {}
        # Conversations left open by an earlier process, loaded once, so a restart resumes them.
        self._orphans: dict[SessionKey, list[int]] | None = None
        self._orphans_lock = asyncio.Lock()
        self._in_flight = InFlight()
        self._closing = False
        self._handlers: dict[str, CommandHandler] = {
            "start": self._cmd_start,
            "help": self._cmd_help,
            "reset": self._cmd_reset,
            "end": self._cmd_end,
            "rate": self._cmd_rate,
            "feedback": self._cmd_feedback,
            "forget": self._cmd_forget,
            "status": self._cmd_status,
            "retrain": self._cmd_retrain,
            "rollback": self._cmd_rollback,
        }

    # --- public API ----------------------------------------------------------------------------------

    @property
    def commands(self) -> list[CommandInfo]:
        """Every command, for ``setMyCommands`` / ``app_commands`` (admin ones flagged)."""
        return list(COMMANDS)

    def quiet_for(self, seconds: float) -> bool:
        """Whether no message, command or click has been handled, nor is being, for the last ``seconds``."""
        return self._in_flight.quiet_for(seconds)

    async def handle_message(self, chat: ChatRef, text: str) -> list[Reply]:
        """A user's message: log it, ask the policy, log and return the reply (opening a conversation if needed)."""
        if self._closing:
            return [self._notice(chat, SHUTTING_DOWN, error=True)]
        with self._in_flight.track():
            try:
                return await self._message(chat, text)
            except Exception:
                logger.exception("message from %s failed", chat.user_key)
                return [self._notice(chat, STORAGE_APOLOGY, error=True)]

    async def handle_command(self, chat: ChatRef, name: str, argument: str = "") -> list[Reply]:
        """A command by name (without ``/``; a Telegram ``@botname`` suffix is ignored) and its argument."""
        name = sanitize(name).lstrip("/").split("@", 1)[0].lower()[:32]
        if self._closing:
            return [self._notice(chat, SHUTTING_DOWN, error=True)]
        handler = self._handlers.get(name)
        if handler is None:
            return [self._notice(chat, f"I don't know the command /{name}. Send /help to see what I understand.")]
        info = next(command for command in COMMANDS if command.name == name)
        if info.admin_only and not self.settings.is_admin(chat.platform, chat.user_id):
            return [self._notice(chat, f"/{name} is only for admins of this bot.", error=True)]
        with self._in_flight.track():
            try:
                return await handler(chat, sanitize(argument or ""))
            except Exception:
                logger.exception("/%s from %s failed", name, chat.user_key)
                return [self._notice(chat, STORAGE_APOLOGY, error=True)]

    async def handle_feedback(self, chat: ChatRef, data: str) -> str:
        """A 👍/👎 click: record it on the turn it belongs to; returns a short toast. Never raises."""
        try:
            turn_id, thumbs_up = decode_feedback(data)
        except FeedbackDataError:
            return "That button isn't one of mine, so nothing was recorded."
        if self._closing:
            return SHUTTING_DOWN
        with self._in_flight.track():
            try:
                turn = await self.store.get_turn(turn_id)
                if turn is None or turn.role != Role.AGENT:
                    return "That reply isn't stored (any more), so nothing was recorded."
                conversation = await self.store.get_conversation(turn.conversation_id)
                if conversation is None or conversation.user_key != chat.user_key:
                    return "You can only rate replies in your own conversation; nothing was recorded."
                _, changed = await self.store.record_feedback(
                    conversation_id=turn.conversation_id,
                    user_key=chat.user_key,
                    kind=FeedbackKind.THUMBS,
                    value=1.0 if thumbs_up else -1.0,
                    turn_id=turn_id,
                )
            except StoreError:  # a simultaneous click on the same button recorded it first
                return "Already noted, thanks."
            except Exception:
                logger.exception("feedback from %s failed", chat.user_key)
                return "Sorry, I couldn't save that right now. Please try again."
        if not changed:
            return "Already noted, thanks."
        return "Thanks for the 👍!" if thumbs_up else "Thanks for the 👎, I'll try to do better."

    async def expire_idle_sessions(self) -> int:
        """Close conversations idle longer than ``session_idle_minutes`` (no reward); returns how many."""
        cutoff = self.clock() - timedelta(minutes=self.settings.session_idle_minutes)
        expired = 0
        for key, session in list(self._sessions.items()):
            if session.last_active >= cutoff or session.lock.locked():
                continue
            async with session.lock:
                if session.last_active >= cutoff or self._sessions.get(key) is not session:
                    continue
                if session.conversation_id is not None:
                    await self.store.close_conversation(session.conversation_id, status=ConversationStatus.EXPIRED)
                    expired += 1
                del self._sessions[key]
        return expired + await self._expire_orphans(cutoff)

    async def shutdown(self) -> None:
        """Refuse new turns and wait for those in flight; open conversations stay open to resume later."""
        self._closing = True
        await self._in_flight.idle()
        still_open = sum(1 for session in self._sessions.values() if session.conversation_id is not None)
        logger.info("dialogue service stopped; %d open conversations stay open to resume", still_open)

    # --- messages ------------------------------------------------------------------------------------

    async def _message(self, chat: ChatRef, raw: str) -> list[Reply]:
        text = sanitize(raw)
        if not text:
            return [self._notice(chat, "That message was empty. Write me something, or send /help.", error=True)]
        limit = self.settings.max_message_chars
        if len(text) > limit:
            return [
                self._notice(
                    chat,
                    f"That message is {len(text):,} characters long; I can read at most {limit:,}. "
                    "Please send a shorter one.",
                    error=True,
                )
            ]
        async with self._session(chat) as session:
            replies: list[Reply] = []
            if session.conversation_id is None:
                replies.append(await self._open(chat, session))
            try:
                replies.extend(await self._turn(chat, session, text))
            except StoreError:
                # Closed behind our back (another replica expired it): continue in a fresh conversation.
                logger.warning("conversation %s was closed elsewhere; starting a new one", session.conversation_id)
                session.close()
                replies.append(await self._open(chat, session))
                replies.extend(await self._turn(chat, session, text))
            return replies

    async def _turn(self, chat: ChatRef, session: Session, text: str) -> list[Reply]:
        """Log the user's turn, get the policy's reply and log it; the caller holds the session lock."""
        assert session.conversation_id is not None
        with self.policies.current() as policy:
            await self.store.append_turn(session.conversation_id, Role.USER, text, policy_version_id=policy.version_id)
            session.add(Message(role="user", text=text))
            session.last_active = self.clock()
            started = time.perf_counter()
            try:
                answer = sanitize(
                    await asyncio.wait_for(policy.respond(history_window(session.history)), self.policy_timeout_s)
                )
            except Exception:
                logger.exception("policy %s failed for %s", policy.name, chat.user_key)
                answer = ""
            latency_ms = (time.perf_counter() - started) * 1000
            if not answer:
                return [self._notice(chat, POLICY_APOLOGY, error=True, private=False)]
            review = self.guard.review(session.history, answer)
            if review.replaced is not None:
                logger.info("reply of %s for %s replaced: %s", policy.name, chat.user_key, review.replaced)
                answer = review.text
            turn = await self.store.append_turn(
                session.conversation_id, Role.AGENT, answer, policy_version_id=policy.version_id, latency_ms=latency_ms
            )
        session.add(Message(role="agent", text=answer))
        session.last_active = self.clock()
        replies = [self._agent_reply(chat, answer, turn.id)]
        if session.agent_turns == self.task.max_turns:
            replies.append(
                self._notice(chat, "When you're done, tell me how it went: /end good, /end bad or /rate 1-5.")
            )
        return replies

    async def _open(self, chat: ChatRef, session: Session) -> Reply:
        """Open a conversation and log the task's opening line as its first agent turn."""
        version_id = self.policies.version_id
        conversation = await self.store.start_conversation(
            source=Source.REAL,
            platform=chat.platform,
            task=self.task.name,
            chat_key=f"{chat.platform}:{chat.chat_id}",
            user_key=chat.user_key,
            meta={"group": chat.is_group},
            policy_version_id=version_id,
        )
        assert conversation.id is not None
        turn = await self.store.append_turn(
            conversation.id, Role.AGENT, self.task.opening_line, policy_version_id=version_id
        )
        session.open(conversation.id)
        session.add(Message(role="agent", text=self.task.opening_line))
        session.last_active = self.clock()
        return self._agent_reply(chat, self.task.opening_line, turn.id)

    async def _close(
        self,
        session: Session,
        *,
        reward: float | None = None,
        reward_source: str | None = None,
        status: str = ConversationStatus.CLOSED,
    ) -> None:
        assert session.conversation_id is not None
        await self.store.close_conversation(
            session.conversation_id, reward=reward, reward_source=reward_source, status=status
        )
        session.close()

    # --- commands ------------------------------------------------------------------------------------

    async def _cmd_start(self, chat: ChatRef, argument: str) -> list[Reply]:
        async with self._session(chat) as session:
            if session.conversation_id is not None:
                await self._close(session)
            return [await self._open(chat, session)]

    async def _cmd_reset(self, chat: ChatRef, argument: str) -> list[Reply]:
        async with self._session(chat) as session:
            had_one = session.conversation_id is not None
            if had_one:
                await self._close(session)
            notice = "Okay, let's start over." if had_one else "There was nothing to reset; here's a fresh start."
            return [self._notice(chat, notice, private=False), await self._open(chat, session)]

    async def _cmd_help(self, chat: ChatRef, argument: str) -> list[Reply]:
        admin = self.settings.is_admin(chat.platform, chat.user_id)
        lines = [
            f"I'm {self.task.agent_role}. {self.task.agent_goal}",
            "Just write to me. Commands:",
            *(
                f"/{c.name}{f' [{c.argument}]' if c.argument else ''} - {c.description}"
                for c in COMMANDS
                if admin or not c.admin_only
            ),
            "Type + or - to rate my last reply." if chat.platform == "console" else "Rate any reply with 👍 or 👎.",
            "Conversations and ratings help me improve; /forget deletes yours.",
        ]
        return [self._notice(chat, "\n".join(lines))]

    async def _cmd_end(self, chat: ChatRef, argument: str) -> list[Reply]:
        verdict = argument.lower()
        if verdict not in ("", "good", "bad"):
            return [self._notice(chat, "Use /end good or /end bad (or just /end).", error=True)]
        async with self._session(chat) as session:
            if session.conversation_id is None:
                return [self._notice(chat, "There's no open conversation to end. Send a message to start one.")]
            if not verdict:
                await self._close(session)
                return [self._notice(chat, "Conversation ended. How did it go? Send /rate 1-5.")]
            await self._close(session, reward=1.0 if verdict == "good" else 0.0, reward_source="end")
        thanks = "Glad it helped!" if verdict == "good" else "Sorry it didn't work out; that helps me learn."
        return [self._notice(chat, f"Conversation ended. {thanks} Send a message to start a new one.")]

    async def _cmd_rate(self, chat: ChatRef, argument: str) -> list[Reply]:
        if argument not in ("1", "2", "3", "4", "5"):
            return [self._notice(chat, "Use /rate with a number from 1 (bad) to 5 (great), e.g. /rate 4.", error=True)]
        stars = int(argument)
        reward = (stars - 1) / 4
        async with self._session(chat) as session:
            conversation_id = session.last_conversation_id
            if conversation_id is None:
                return [self._notice(chat, "There's no conversation to rate yet. Send a message to start one.")]
            await self.store.record_feedback(
                conversation_id=conversation_id, user_key=chat.user_key, kind=FeedbackKind.RATING, value=stars
            )
            if session.conversation_id is not None:
                await self._close(session, reward=reward, reward_source="rating")
            else:
                await self.store.set_reward(conversation_id, reward, "rating")
        return [self._notice(chat, f"Thanks for rating {stars}/5! Send a message to start a new conversation.")]

    async def _cmd_feedback(self, chat: ChatRef, argument: str) -> list[Reply]:
        if not argument:
            return [self._notice(chat, "Write your feedback after the command, e.g. /feedback ask fewer questions.")]
        limit = self.settings.max_message_chars
        if len(argument) > limit:
            return [self._notice(chat, f"That feedback is longer than {limit:,} characters; please shorten it.")]
        async with self._session(chat) as session:
            conversation_id = session.last_conversation_id
            if conversation_id is None:
                return [self._notice(chat, "Feedback belongs to a conversation: send a message first, then /feedback.")]
            await self.store.record_feedback(
                conversation_id=conversation_id, user_key=chat.user_key, kind=FeedbackKind.TEXT, text=argument
            )
        return [self._notice(chat, "Thanks, your feedback is saved.")]

    async def _cmd_forget(self, chat: ChatRef, argument: str) -> list[Reply]:
        # Hold every session of this user (all their chats on this platform) so no turn lands mid-deletion.
        await self._load_orphans()
        keys = sorted(k for k in self._sessions if f"{k[0]}:{k[2]}" == chat.user_key)
        async with contextlib.AsyncExitStack() as stack:
            for key in keys:
                await stack.enter_async_context(self._sessions[key].lock)
            deleted = await self.store.forget_user(chat.user_key)
            for key in keys:
                self._sessions.pop(key, None)
            assert self._orphans is not None
            for key in [k for k in self._orphans if f"{k[0]}:{k[2]}" == chat.user_key]:
                del self._orphans[key]
        # Copies outside the database: a run's input file being trained on now, exports the project wrote.
        # The database deletion above is what counts; a file this process cannot reach is logged, not fatal.
        try:
            report = await purge_forgotten(self.store, self.settings.data_dir)
            if report.unreachable:
                logger.warning(
                    "/forget: cannot reach %d registered export file(s): %s",
                    len(report.unreachable),
                    ", ".join(map(str, report.unreachable)),
                )
        except Exception:
            logger.exception("/forget: removing %s from files failed", chat.user_key)
        return [
            self._notice(
                chat,
                f"Done: deleted {deleted} conversation{'s' if deleted != 1 else ''} with all turns and feedback. "
                "None of your conversations will be used for training, and no policy trained on them from now on "
                "will be put into service.",
            )
        ]

    async def _cmd_status(self, chat: ChatRef, argument: str) -> list[Reply]:
        policy = self.policies.active
        version = f"version #{policy.version_id}" if policy.version_id is not None else "untrained base model"
        lines = [f"Active policy: {policy.name} ({version}), task {self.task.name}"]
        stored = await self.store.active_policy_version()
        if stored is not None and stored.metrics:
            lines.append("Metrics: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(stored.metrics.items())))
        run = await self.store.last_training_run()
        if run is None:
            lines.append("Last training run: none yet")
        else:
            finished = f", finished {run.finished_at:%Y-%m-%d %H:%M} UTC" if run.finished_at else ""
            lines.append(
                f"Last training run: #{run.id} {run.status} ({run.trigger}), started {run.started_at:%Y-%m-%d %H:%M}"
                f" UTC{finished}, {run.n_imagined} imagined + {run.n_real} real dialogues"
                + (f", error: {run.error[:200]}" if run.error else "")
            )
        total = await self.store.count_conversations(source=Source.REAL)
        rewarded = await self.store.count_conversations(source=Source.REAL, with_reward=True)
        lines.append(f"Real conversations: {total} ({rewarded} with a reward); open sessions: {len(self._sessions)}")
        if self.improver is None:
            lines.append("Improvement loop: not running in this process.")
        else:
            lines.extend(await self.improver.status_lines())
        return [self._notice(chat, "\n".join(lines))]

    async def _cmd_retrain(self, chat: ChatRef, argument: str) -> list[Reply]:
        if self.improver is None:
            return [self._notice(chat, NO_IMPROVER.format(what="retrain"), error=True)]
        return [self._notice(chat, await self.improver.request_run(trigger="admin", requested_by=chat.user_key))]

    async def _cmd_rollback(self, chat: ChatRef, argument: str) -> list[Reply]:
        if self.improver is None:
            return [self._notice(chat, NO_IMPROVER.format(what="roll back"), error=True)]
        return [self._notice(chat, await self.improver.rollback(requested_by=chat.user_key))]

    # --- sessions ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session(self, chat: ChatRef) -> AsyncIterator[Session]:
        """The caller's session, locked, with any conversation an earlier process left open resumed."""
        key = chat.session_key
        while True:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session(key=key, last_active=self.clock())
            async with session.lock:
                # Expiry or /forget may have dropped this session while we waited: take the fresh one.
                if self._sessions.get(key) is not session:
                    continue
                if not session.resumed:
                    await self._resume(session)
                    session.resumed = True
                await self._sync(session)
                yield session
                return

    async def _sync(self, session: Session) -> None:
        """Bring the cached session in line with the database: another replica may have opened, continued or
        closed this user's conversation since this one last served them. Costs one small query per message."""
        platform, chat_id, user_id = session.key
        stored = await self.store.open_conversation_of(f"{platform}:{chat_id}", f"{platform}:{user_id}")
        if stored is None:
            if session.conversation_id is not None:
                session.close()  # closed elsewhere (/end, expiry on another replica)
            return
        conversation_id, turn_count = stored
        if conversation_id == session.conversation_id and turn_count == session.stored_turns:
            return
        session.open(conversation_id)
        for turn in await self.store.get_turns(conversation_id):
            session.add(Message(role="agent" if turn.role == Role.AGENT else "user", text=turn.text))

    async def _resume(self, session: Session) -> None:
        await self._load_orphans()
        assert self._orphans is not None
        ids = sorted(self._orphans.pop(session.key, []))
        if not ids:
            return
        for stale in ids[:-1]:  # more than one open conversation: keep only the newest
            await self.store.close_conversation(stale, status=ConversationStatus.EXPIRED)
        turns = await self.store.get_turns(ids[-1])
        idle_limit = self.clock() - timedelta(minutes=self.settings.session_idle_minutes)
        if turns and turns[-1].created_at < idle_limit:
            await self.store.close_conversation(ids[-1], status=ConversationStatus.EXPIRED)
            return
        session.open(ids[-1])
        for turn in turns:
            session.add(Message(role="agent" if turn.role == Role.AGENT else "user", text=turn.text))
        logger.info("resumed conversation %d of %s with %d turns", ids[-1], session.key, len(turns))

    async def _load_orphans(self) -> None:
        if self._orphans is not None:
            return
        async with self._orphans_lock:
            if self._orphans is not None:
                return
            orphans: dict[SessionKey, list[int]] = {}
            for conversation in await self.store.open_conversations():
                key = _session_key(conversation)
                if key is not None and conversation.id is not None:
                    orphans.setdefault(key, []).append(conversation.id)
            self._orphans = orphans

    async def _expire_orphans(self, cutoff: datetime) -> int:
        """Close conversations an earlier process left open whose last turn is older than ``cutoff``."""
        in_memory = {s.conversation_id for s in self._sessions.values()}
        expired = 0
        for conversation in await self.store.open_conversations(idle_since=cutoff):
            if conversation.id in in_memory or conversation.id is None:
                continue
            turns = await self.store.get_turns(conversation.id)
            last_active = turns[-1].created_at if turns else conversation.started_at
            if last_active >= cutoff:
                continue
            await self.store.close_conversation(conversation.id, status=ConversationStatus.EXPIRED)
            expired += 1
            key = _session_key(conversation)
            if self._orphans is not None and key in self._orphans:
                self._orphans[key] = [i for i in self._orphans[key] if i != conversation.id]
        return expired

    # --- replies -------------------------------------------------------------------------------------

    def _agent_reply(self, chat: ChatRef, text: str, turn_id: int | None) -> Reply:
        return Reply(text=text, turn_id=turn_id)

    def _notice(self, chat: ChatRef, text: str, *, error: bool = False, private: bool = True) -> Reply:
        # Notices quote run errors and improver messages, which may carry text from a child's traceback.
        return Reply(text=redaction.redact(text), private=private, is_error=error)


def _session_key(conversation: storage.Conversation) -> SessionKey | None:
    """The session a stored conversation belongs to, from its ``platform:chat`` and ``platform:user`` keys."""
    prefix = f"{conversation.platform}:"
    if not (conversation.chat_key.startswith(prefix) and conversation.user_key.startswith(prefix)):
        return None
    return (conversation.platform, conversation.chat_key[len(prefix) :], conversation.user_key[len(prefix) :])


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)[:40]
