"""Queries the rest of Reverie needs, each one transaction, retried when the database is busy.

The bot logs turns and feedback through :class:`Store`; the learning code reads training dialogues as
plain :class:`DialogueRecord` values, never ORM objects, so it does not depend on sessions.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from storage.database import Database, retry_transient
from storage.models import (
    Conversation,
    ConversationStatus,
    DataDeletion,
    ExportFile,
    Feedback,
    FeedbackKind,
    PolicyStatus,
    PolicyVersion,
    Role,
    RunStatus,
    Source,
    TrainingRun,
    Turn,
    utcnow,
)


class StoreError(ValueError):
    """A request the data does not allow (unknown id, wrong owner, closed conversation)."""


class ForgottenDataError(StoreError):
    """A candidate was trained on conversations deleted by ``/forget`` since they were selected."""


class PolicyChangedError(StoreError):
    """The active policy changed between reading it and acting on it (a concurrent rollback or promotion)."""


def new_idempotency_key() -> str:
    """A fresh key for one logical write (it stays the same across that write's retries)."""
    return uuid.uuid4().hex


@dataclass(slots=True)
class UpdateScope:
    """A platform update being handled (:func:`handling_update`): its turns get keys derived from the update."""

    #: ``platform:bot:update_id``, the same every time the platform delivers this update.
    key: str
    user_stored: bool = False
    reply_stored: bool = False


_UPDATE: ContextVar[UpdateScope | None] = ContextVar("reverie_update", default=None)


@contextlib.contextmanager
def handling_update(key: str) -> Iterator[UpdateScope]:
    """Within the block, :meth:`Store.append_turn` keys the first user turn ``<key>:user`` and the agent turn
    after it ``<key>:reply``: a redelivered update (handled before a crash but never confirmed to the platform)
    stores neither twice, and :meth:`Store.update_reply` finds its reply when it was stored already."""
    scope = UpdateScope(key)
    token = _UPDATE.set(scope)
    try:
        yield scope
    finally:
        _UPDATE.reset(token)


def _update_turn_key(role: str) -> str | None:
    scope = _UPDATE.get()
    if scope is None:
        return None
    if role == Role.USER and not scope.user_stored:
        scope.user_stored = True
        return f"{scope.key}:user"
    if role == Role.AGENT and scope.user_stored and not scope.reply_stored:
        scope.reply_stored = True
        return f"{scope.key}:reply"
    return None


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """A conversation with what an operator looks at first: how long, and how it was received."""

    conversation: Conversation
    turns: int
    thumbs_up: int
    thumbs_down: int


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One turn of a dialogue as the learning code sees it."""

    role: str
    text: str
    turn_id: int | None = None
    thumbs: float | None = None  # mean 👍(+1)/👎(−1) on this turn, if any


@dataclass(frozen=True, slots=True)
class DialogueRecord:
    """A stored dialogue with its outcome, detached from the database."""

    id: int | None
    source: str
    task: str
    turns: tuple[TurnRecord, ...]
    reward: float | None
    persona: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    platform: str = ""
    ended_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: one line of ``reverie dialogues export --format jsonl``."""
        return {
            "id": self.id,
            "source": self.source,
            "task": self.task,
            "reward": self.reward,
            "persona": self.persona,
            "meta": self.meta,
            "platform": self.platform,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "turns": [{"role": t.role, "text": t.text, "thumbs": t.thumbs} for t in self.turns],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DialogueRecord:
        """Parse :meth:`to_dict` output (or a user's own JSONL line); :class:`StoreError` names the problem."""
        if not isinstance(data, dict):
            raise StoreError("a dialogue must be a JSON object")
        turns = data.get("turns")
        if not isinstance(turns, list) or not turns:
            raise StoreError("a dialogue needs a non-empty 'turns' list")
        parsed: list[TurnRecord] = []
        for position, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
                raise StoreError(f"turn {position}: needs 'role' and a string 'text'")
            thumbs = turn.get("thumbs")
            parsed.append(
                TurnRecord(
                    role=_validate_role(turn.get("role", "")),
                    text=turn["text"],
                    thumbs=None if thumbs is None else float(thumbs),
                )
            )
        reward = data.get("reward")
        if reward is not None and not isinstance(reward, int | float):
            raise StoreError(f"'reward' must be a number or null, not {reward!r}")
        ended = data.get("ended_at")
        return cls(
            id=data.get("id"),
            source=str(data.get("source", Source.IMAGINED)),
            task=str(data.get("task", "")),
            turns=tuple(parsed),
            reward=None if reward is None else float(reward),
            persona=data.get("persona"),
            meta=dict(data.get("meta") or {}),
            platform=str(data.get("platform", "")),
            ended_at=datetime.fromisoformat(ended) if isinstance(ended, str) else None,
        )


def _validate_role(role: str) -> str:
    if role not in (Role.USER, Role.AGENT):
        raise StoreError(f"role must be 'user' or 'agent', not {role!r}")
    return str(role)


class Store:
    """All reads and writes of Reverie's data."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # --- conversations and turns ---------------------------------------------------------------------

    async def start_conversation(
        self,
        *,
        source: str,
        platform: str,
        task: str,
        chat_key: str = "",
        user_key: str = "",
        persona: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        policy_version_id: int | None = None,
        consent: bool = True,
        idempotency_key: str | None = None,
    ) -> Conversation:
        """Open a conversation and return it (with its id); a retried call opens it once."""
        Source(source)
        return await self._start_conversation(
            dict(
                source=source,
                platform=platform,
                task=task,
                chat_key=chat_key,
                user_key=user_key,
                persona=persona,
                meta=meta or {},
                policy_version_id=policy_version_id,
                consent=consent,
            ),
            idempotency_key or new_idempotency_key(),
        )

    @retry_transient()
    async def _start_conversation(self, values: dict[str, Any], key: str) -> Conversation:
        async with self.database.session() as session:
            # A retry after a commit whose acknowledgement was lost finds the conversation it opened.
            existing = (await session.exec(select(Conversation).where(Conversation.idempotency_key == key))).first()
            if existing is not None:
                return existing
            conversation = Conversation(**values, idempotency_key=key)
            session.add(conversation)
        return conversation

    async def append_turn(
        self,
        conversation_id: int,
        role: str,
        text: str,
        *,
        policy_version_id: int | None = None,
        latency_ms: float | None = None,
        idempotency_key: str | None = None,
    ) -> Turn:
        """Append a turn at the next index of an open conversation.

        Safe to retry: every attempt of one call carries the same idempotency key, so an attempt that follows a
        commit whose acknowledgement was lost returns the turn already stored instead of storing it twice.
        Pass your own ``idempotency_key`` to make repeated *calls* for the same utterance safe as well; inside
        :func:`handling_update` the update's user turn and reply get keys derived from the update id.
        """
        _validate_role(role)
        return await self._append_turn(
            conversation_id,
            role,
            text,
            policy_version_id=policy_version_id,
            latency_ms=latency_ms,
            key=idempotency_key or _update_turn_key(role) or new_idempotency_key(),
        )

    @retry_transient()
    async def update_reply(self, update_key: str) -> Turn | None:
        """The stored reply to a platform update (:func:`handling_update`), if it was handled before."""
        async with self.database.session() as session:
            return (await session.exec(select(Turn).where(Turn.idempotency_key == f"{update_key}:reply"))).first()

    @retry_transient()
    async def _append_turn(
        self,
        conversation_id: int,
        role: str,
        text: str,
        *,
        policy_version_id: int | None,
        latency_ms: float | None,
        key: str,
    ) -> Turn:
        async with self.database.session() as session:
            conversation = await session.get(Conversation, conversation_id, with_for_update=True)
            if conversation is None:
                raise StoreError(f"no conversation {conversation_id}")
            # Checked before the status: the conversation may have been closed after our lost commit.
            existing = (await session.exec(select(Turn).where(Turn.idempotency_key == key))).first()
            if existing is not None:
                return existing
            if conversation.status != ConversationStatus.OPEN:
                raise StoreError(f"conversation {conversation_id} is {conversation.status}")
            # max + 1, not a count: positions stay unique even if a turn is ever removed from the middle.
            last = (
                await session.exec(select(func.max(Turn.index)).where(Turn.conversation_id == conversation_id))
            ).one()
            turn = Turn(
                conversation_id=conversation_id,
                index=0 if last is None else last + 1,
                role=role,
                text=text,
                policy_version_id=policy_version_id,
                latency_ms=latency_ms,
                idempotency_key=key,
            )
            session.add(turn)
        return turn

    @retry_transient()
    async def close_conversation(
        self,
        conversation_id: int,
        *,
        reward: float | None = None,
        reward_source: str | None = None,
        status: str = ConversationStatus.CLOSED,
    ) -> Conversation:
        """End a conversation, optionally with its terminal reward. Closing twice keeps the first end."""
        async with self.database.session() as session:
            conversation = await session.get(Conversation, conversation_id)
            if conversation is None:
                raise StoreError(f"no conversation {conversation_id}")
            if conversation.status == ConversationStatus.OPEN:
                conversation.status = ConversationStatus(status)
                conversation.ended_at = utcnow()
            if reward is not None:
                conversation.reward = float(reward)
                conversation.reward_source = reward_source
            session.add(conversation)
        return conversation

    @retry_transient()
    async def set_reward(self, conversation_id: int, reward: float, reward_source: str) -> Conversation:
        """Set (or replace) the terminal reward of a conversation, open or closed."""
        async with self.database.session() as session:
            conversation = await session.get(Conversation, conversation_id)
            if conversation is None:
                raise StoreError(f"no conversation {conversation_id}")
            conversation.reward = float(reward)
            conversation.reward_source = reward_source
            session.add(conversation)
        return conversation

    @retry_transient()
    async def save_dialogue(
        self,
        *,
        source: str,
        platform: str,
        task: str,
        turns: Sequence[tuple[str, str]],
        reward: float | None,
        reward_source: str | None = None,
        persona: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        policy_version_id: int | None = None,
        user_key: str = "",
    ) -> Conversation:
        """Store a finished dialogue (imagined, imported or evaluation) in one transaction."""
        Source(source)
        if not turns:
            raise StoreError("a dialogue needs at least one turn")
        now = utcnow()
        conversation = Conversation(
            source=source,
            platform=platform,
            task=task,
            user_key=user_key,
            persona=persona,
            meta=meta or {},
            policy_version_id=policy_version_id,
            status=ConversationStatus.CLOSED,
            ended_at=now,
            reward=reward,
            reward_source=reward_source,
        )
        async with self.database.session() as session:
            session.add(conversation)
            await session.flush()
            for index, (role, text) in enumerate(turns):
                session.add(
                    Turn(
                        conversation_id=conversation.id,
                        index=index,
                        role=_validate_role(role),
                        text=text,
                        created_at=now,
                        policy_version_id=policy_version_id,
                    )
                )
        return conversation

    @retry_transient()
    async def get_conversation(self, conversation_id: int) -> Conversation | None:
        """A conversation by id."""
        async with self.database.session() as session:
            return await session.get(Conversation, conversation_id)

    @retry_transient()
    async def get_turn(self, turn_id: int) -> Turn | None:
        """A turn by id."""
        async with self.database.session() as session:
            return await session.get(Turn, turn_id)

    @retry_transient()
    async def get_turns(self, conversation_id: int) -> list[Turn]:
        """The turns of a conversation in order."""
        async with self.database.session() as session:
            rows = await session.exec(
                select(Turn).where(Turn.conversation_id == conversation_id).order_by(col(Turn.index))
            )
            return list(rows.all())

    @retry_transient()
    async def open_conversations(self, idle_since: datetime | None = None) -> list[Conversation]:
        """Open real conversations, optionally only those started before ``idle_since``."""
        async with self.database.session() as session:
            query = select(Conversation).where(
                Conversation.status == ConversationStatus.OPEN, Conversation.source == Source.REAL
            )
            if idle_since is not None:
                query = query.where(col(Conversation.started_at) < idle_since)
            return list((await session.exec(query)).all())

    @retry_transient()
    async def open_conversation_of(self, chat_key: str, user_key: str) -> tuple[int, int] | None:
        """``(id, number of turns)`` of a chat user's newest open real conversation, or ``None``.

        Replicas behind a load balancer each cache a session; one look at this per message tells a replica whether
        another one has opened, continued or closed the conversation since (one indexed query, no turn texts)."""
        async with self.database.session() as session:
            newest = (
                await session.exec(
                    select(Conversation.id)
                    .where(
                        Conversation.status == ConversationStatus.OPEN,
                        Conversation.source == Source.REAL,
                        Conversation.chat_key == chat_key,
                        Conversation.user_key == user_key,
                    )
                    .order_by(col(Conversation.id).desc())
                    .limit(1)
                )
            ).first()
            if newest is None:
                return None
            turns = (await session.exec(select(func.count()).where(Turn.conversation_id == newest))).one()
            return int(newest), int(turns)

    @retry_transient()
    async def count_conversations(
        self, *, source: str | None = None, task: str | None = None, with_reward: bool = False
    ) -> int:
        """How many conversations match."""
        async with self.database.session() as session:
            query = select(func.count()).select_from(Conversation)
            if source is not None:
                query = query.where(Conversation.source == source)
            if task is not None:
                query = query.where(Conversation.task == task)
            if with_reward:
                query = query.where(col(Conversation.reward).is_not(None))
            return (await session.exec(query)).one()

    # --- feedback ------------------------------------------------------------------------------------

    async def record_feedback(
        self,
        *,
        conversation_id: int,
        user_key: str,
        kind: str,
        value: float | None = None,
        text: str | None = None,
        turn_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[Feedback, bool]:
        """Record feedback; returns it and whether it changed anything.

        Thumbs on a turn are idempotent per (turn, user): clicking 👍 twice records one 👍, switching to
        👎 replaces it. A turn must belong to the conversation and be an agent turn. Retries of one call store
        a rating or a text once (see :meth:`append_turn`).
        """
        FeedbackKind(kind)
        return await self._record_feedback(
            conversation_id=conversation_id,
            user_key=user_key,
            kind=kind,
            value=value,
            text=text,
            turn_id=turn_id,
            key=idempotency_key or new_idempotency_key(),
        )

    @retry_transient()
    async def _record_feedback(
        self,
        *,
        conversation_id: int,
        user_key: str,
        kind: str,
        value: float | None,
        text: str | None,
        turn_id: int | None,
        key: str,
    ) -> tuple[Feedback, bool]:
        async with self.database.session() as session:
            conversation = await session.get(Conversation, conversation_id)
            if conversation is None:
                raise StoreError(f"no conversation {conversation_id}")
            done = (await session.exec(select(Feedback).where(Feedback.idempotency_key == key))).first()
            if done is not None:  # this call's earlier attempt committed: report what it did
                return done, True
            if turn_id is not None:
                turn = await session.get(Turn, turn_id)
                if turn is None or turn.conversation_id != conversation_id:
                    raise StoreError(f"turn {turn_id} is not part of conversation {conversation_id}")
                existing = (
                    await session.exec(
                        select(Feedback).where(
                            Feedback.turn_id == turn_id, Feedback.user_key == user_key, Feedback.kind == kind
                        )
                    )
                ).first()
                if existing is not None:
                    changed = existing.value != value or existing.text != text
                    existing.value, existing.text, existing.created_at = value, text, utcnow()
                    if changed:  # so a retry of this switch reports it as the change it was
                        existing.idempotency_key = key
                    session.add(existing)
                    return existing, changed
            feedback = Feedback(
                conversation_id=conversation_id,
                turn_id=turn_id,
                user_key=user_key,
                kind=kind,
                value=value,
                text=text,
                idempotency_key=key,
            )
            session.add(feedback)
            try:
                await session.flush()
            except IntegrityError as error:  # a concurrent click on the same turn won the race
                raise StoreError("feedback already recorded") from error
        return feedback, True

    # --- training data -------------------------------------------------------------------------------

    @retry_transient()
    async def dialogues_for_training(
        self,
        *,
        sources: Iterable[str] = (Source.IMAGINED, Source.REAL),
        task: str | None = None,
        since: datetime | None = None,
        with_reward: bool = True,
        limit: int | None = None,
        newest: bool = False,
        ids: Sequence[int] | None = None,
    ) -> list[DialogueRecord]:
        """Closed, consented dialogues with their turns and per-turn thumbs, oldest first.

        ``limit`` keeps the oldest that many, or the newest with ``newest=True`` (still returned oldest first).
        Evaluation episodes are never training data unless asked for by source explicitly.
        """
        async with self.database.session() as session:
            query = select(Conversation).where(
                col(Conversation.source).in_([Source(s).value for s in sources]),
                col(Conversation.consent).is_(True),
                Conversation.status != ConversationStatus.OPEN,
            )
            if task is not None:
                query = query.where(Conversation.task == task)
            if since is not None:
                query = query.where(col(Conversation.ended_at) > since)
            if with_reward:
                query = query.where(col(Conversation.reward).is_not(None))
            if ids is not None:
                query = query.where(col(Conversation.id).in_(list(ids)))
            deleted_users = select(DataDeletion.user_key)
            query = query.where((Conversation.user_key == "") | col(Conversation.user_key).not_in(deleted_users))
            query = query.order_by(col(Conversation.id).desc() if newest else col(Conversation.id))
            if limit is not None:
                query = query.limit(limit)
            conversations = list((await session.exec(query)).all())
            if newest:
                conversations.reverse()
            if not conversations:
                return []
            conversation_ids = [c.id for c in conversations]
            turns = (
                await session.exec(
                    select(Turn)
                    .where(col(Turn.conversation_id).in_(conversation_ids))
                    .order_by(col(Turn.conversation_id), col(Turn.index))
                )
            ).all()
            thumbs_rows = (
                await session.exec(
                    select(Feedback.turn_id, func.avg(Feedback.value))
                    .where(
                        col(Feedback.conversation_id).in_(conversation_ids),
                        Feedback.kind == FeedbackKind.THUMBS,
                        col(Feedback.turn_id).is_not(None),
                    )
                    .group_by(col(Feedback.turn_id))
                )
            ).all()
        thumbs = {turn_id: float(mean) for turn_id, mean in thumbs_rows if mean is not None}
        by_conversation: dict[int, list[TurnRecord]] = {cid: [] for cid in conversation_ids if cid is not None}
        for turn in turns:
            by_conversation[turn.conversation_id].append(
                TurnRecord(role=turn.role, text=turn.text, turn_id=turn.id, thumbs=thumbs.get(turn.id))
            )
        return [
            DialogueRecord(
                id=c.id,
                source=c.source,
                task=c.task,
                turns=tuple(by_conversation.get(c.id or -1, ())),
                reward=c.reward,
                persona=c.persona,
                meta=dict(c.meta or {}),
                platform=c.platform,
                ended_at=c.ended_at,
            )
            for c in conversations
        ]

    # --- deletion ------------------------------------------------------------------------------------

    async def forget_user(self, user_key: str) -> int:
        """Delete every conversation, turn and feedback of ``user_key``; returns conversations deleted.

        A tombstone keeps the user out of training sets selected before the deletion finished and records the
        deleted conversation ids, so files written earlier (run inputs, exports) can be cleaned by any process
        (:meth:`forgotten_conversation_ids`). On SQLite the freed pages are overwritten and the write-ahead log
        truncated, so the text does not linger in the database files either.
        """
        if not user_key:
            raise StoreError("an empty user key would match imagined dialogues")
        deleted = await self._forget_user(user_key, new_idempotency_key())
        await self.database.purge_deleted_pages()
        return deleted

    @retry_transient()
    async def _forget_user(self, user_key: str, key: str) -> int:
        async with self.database.session() as session:
            done = (await session.exec(select(DataDeletion).where(DataDeletion.idempotency_key == key))).first()
            if done is not None:  # a retry after our commit: report what that attempt deleted
                return done.conversations
            ids = list((await session.exec(select(Conversation.id).where(Conversation.user_key == user_key))).all())
            if ids:
                await session.exec(delete(Feedback).where(col(Feedback.conversation_id).in_(ids)))
                await session.exec(delete(Turn).where(col(Turn.conversation_id).in_(ids)))
                await session.exec(delete(Conversation).where(col(Conversation.id).in_(ids)))
            await session.exec(delete(Feedback).where(Feedback.user_key == user_key))
            session.add(
                DataDeletion(
                    user_key=user_key,
                    conversations=len(ids),
                    conversation_ids=sorted(i for i in ids if i is not None),
                    idempotency_key=key,
                )
            )
        return len(ids)

    @retry_transient()
    async def forgotten_conversation_ids(self) -> set[int]:
        """Ids of every conversation ever deleted by :meth:`forget_user`."""
        async with self.database.session() as session:
            rows = (await session.exec(select(DataDeletion.conversation_ids))).all()
        return {int(i) for ids in rows for i in (ids or [])}

    @retry_transient()
    async def register_export(self, path: str) -> None:
        """Remember a dialogue file the project wrote, so ``/forget`` can rewrite it (idempotent)."""
        async with self.database.session() as session:
            if (await session.exec(select(ExportFile).where(ExportFile.path == path))).first() is None:
                session.add(ExportFile(path=path))

    @retry_transient()
    async def export_paths(self) -> list[str]:
        """Every registered export file, oldest first."""
        async with self.database.session() as session:
            return list((await session.exec(select(ExportFile.path).order_by(col(ExportFile.id)))).all())

    # --- policy versions -----------------------------------------------------------------------------

    @retry_transient()
    async def register_policy_version(
        self,
        *,
        path: str,
        sha256: str,
        base_model: str,
        algorithm: str,
        metrics: dict[str, Any] | None = None,
        parent_id: int | None = None,
    ) -> PolicyVersion:
        """Record a trained checkpoint as a candidate."""
        version = PolicyVersion(
            path=path,
            sha256=sha256,
            base_model=base_model,
            algorithm=algorithm,
            metrics=metrics or {},
            parent_id=parent_id,
        )
        async with self.database.session() as session:
            # One checkpoint directory is one version: a retry after a lost commit finds the row it wrote.
            existing = (
                await session.exec(
                    select(PolicyVersion).where(PolicyVersion.path == path, PolicyVersion.sha256 == sha256)
                )
            ).first()
            if existing is not None:
                return existing
            session.add(version)
        return version

    @retry_transient()
    async def activate_policy_version(
        self, version_id: int, *, trained_on: Sequence[int] | None = None
    ) -> PolicyVersion:
        """Make one version active and retire the one it replaces (one transaction).

        ``trained_on``: the real conversations the version was trained on. If any of them has been deleted
        (``/forget``) the version is not activated (:class:`ForgottenDataError`). The check and the activation
        are one transaction and hold those rows (``FOR SHARE`` on PostgreSQL; SQLite has one writer), so a
        ``/forget`` either lands before it and stops the promotion, or waits for it and comes after.
        """
        async with self.database.session() as session:
            version = await session.get(PolicyVersion, version_id)
            if version is None:
                raise StoreError(f"no policy version {version_id}")
            wanted = {int(i) for i in trained_on or ()}
            if wanted:
                present = set(
                    (
                        await session.exec(
                            select(Conversation.id)
                            .where(col(Conversation.id).in_(sorted(wanted)))
                            .with_for_update(read=True)
                        )
                    ).all()
                )
                if missing := wanted - present:
                    raise ForgottenDataError(
                        f"policy version {version_id} was trained on {len(missing)} conversation(s) deleted since "
                        "(a user asked to be forgotten); it is not activated"
                    )
            await session.exec(
                update(PolicyVersion)
                .where(PolicyVersion.status == PolicyStatus.ACTIVE, PolicyVersion.id != version_id)
                .values(status=PolicyStatus.RETIRED)
            )
            version.status = PolicyStatus.ACTIVE
            version.activated_at = utcnow()
            session.add(version)
        return version

    @retry_transient()
    async def set_policy_status(
        self, version_id: int, status: str, metrics: dict[str, Any] | None = None
    ) -> PolicyVersion:
        """Mark a version rejected/retired/candidate (use :meth:`activate_policy_version` to activate)."""
        if PolicyStatus(status) == PolicyStatus.ACTIVE:
            raise StoreError("use activate_policy_version to activate")
        async with self.database.session() as session:
            version = await session.get(PolicyVersion, version_id)
            if version is None:
                raise StoreError(f"no policy version {version_id}")
            version.status = status
            if metrics:
                version.metrics = {**(version.metrics or {}), **metrics}
            session.add(version)
        return version

    @retry_transient()
    async def active_policy_version(self) -> PolicyVersion | None:
        """The version serving now, or ``None`` (prompted base model)."""
        async with self.database.session() as session:
            return (
                await session.exec(select(PolicyVersion).where(PolicyVersion.status == PolicyStatus.ACTIVE))
            ).first()

    @retry_transient()
    async def get_policy_version(self, version_id: int) -> PolicyVersion | None:
        """A policy version by id."""
        async with self.database.session() as session:
            return await session.get(PolicyVersion, version_id)

    @retry_transient()
    async def list_policy_versions(self, limit: int = 50) -> list[PolicyVersion]:
        """Newest first."""
        async with self.database.session() as session:
            rows = await session.exec(select(PolicyVersion).order_by(col(PolicyVersion.id).desc()).limit(limit))
            return list(rows.all())

    async def list_training_runs(self, limit: int = 20) -> list[TrainingRun]:
        """Improvement runs, newest first."""
        async with self.database.session() as session:
            rows = await session.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(limit))
            return list(rows.all())

    async def recent_conversations(self, limit: int = 20) -> list[ConversationSummary]:
        """The newest real conversations with their turn count and 👍/👎 counts, newest first."""
        async with self.database.session() as session:
            conversations = (
                await session.exec(
                    select(Conversation)
                    .where(Conversation.source == Source.REAL)
                    .order_by(col(Conversation.id).desc())
                    .limit(limit)
                )
            ).all()
            ids = [c.id for c in conversations]
            turns = dict(
                (
                    await session.exec(
                        select(Turn.conversation_id, func.count())
                        .where(col(Turn.conversation_id).in_(ids))
                        .group_by(Turn.conversation_id)
                    )
                ).all()
            )
            thumbs = (
                await session.exec(
                    select(Feedback.conversation_id, Feedback.value).where(
                        col(Feedback.conversation_id).in_(ids), Feedback.kind == FeedbackKind.THUMBS
                    )
                )
            ).all()
        up: dict[int, int] = {}
        down: dict[int, int] = {}
        for conversation_id, value in thumbs:
            counter = up if (value or 0) > 0 else down
            counter[conversation_id] = counter.get(conversation_id, 0) + 1
        return [
            ConversationSummary(c, turns.get(c.id, 0), up.get(c.id or 0, 0), down.get(c.id or 0, 0))
            for c in conversations
        ]

    async def daily_rewards(self, days: int = 30) -> list[tuple[str, float, int]]:
        """``(day, mean reward, conversations)`` of real conversations that ended with a reward, per UTC day,
        oldest first, over the last ``days`` days that have any."""
        async with self.database.session() as session:
            rows = (
                await session.exec(
                    select(Conversation.ended_at, Conversation.reward).where(
                        Conversation.source == Source.REAL,
                        col(Conversation.reward).is_not(None),
                        col(Conversation.ended_at).is_not(None),
                    )
                )
            ).all()
        per_day: dict[str, list[float]] = {}
        for ended_at, reward in rows:
            per_day.setdefault(ended_at.date().isoformat(), []).append(float(reward))
        return [(day, sum(values) / len(values), len(values)) for day, values in sorted(per_day.items())][-days:]

    async def rollback_target(self) -> PolicyVersion | None:
        """Where ``/rollback`` goes: the top of :meth:`rollback_stack`, or ``None`` (the base model)."""
        stack = await self.rollback_stack(limit=1)
        return stack[0] if stack else None

    @retry_transient()
    async def rollback_stack(self, limit: int = 50) -> list[PolicyVersion]:
        """The versions served before the active one that a rollback may return to, most recent first.

        The served history is a stack: each activation pushes, each rollback pops. A version's place is its
        last activation; versions left by a rollback (``rolled_back``) are out of it for good, unless someone
        activates them again explicitly. Below the stack lies the prompted base model.
        """
        async with self.database.session() as session:
            rows = await session.exec(
                select(PolicyVersion)
                .where(PolicyVersion.status == PolicyStatus.RETIRED, col(PolicyVersion.activated_at).is_not(None))
                .order_by(col(PolicyVersion.activated_at).desc(), col(PolicyVersion.id).desc())
                .limit(limit)
            )
            return list(rows.all())

    @retry_transient()
    async def roll_back(self, from_id: int, to_id: int | None, *, skipped: Sequence[int] = ()) -> PolicyVersion | None:
        """Pop ``from_id`` (the active version) and any ``skipped`` ones off the stack; activate ``to_id``
        (``None``: the base model serves). Returns the version now active.

        One transaction that applies only if ``from_id`` is still active (:class:`PolicyChangedError` if a
        concurrent rollback or promotion got there first); a retry after a lost acknowledgement sees its own
        result and returns it instead of popping twice.
        """
        async with self.database.session() as session:
            popped = await session.exec(
                update(PolicyVersion)
                .where(col(PolicyVersion.id) == from_id, PolicyVersion.status == PolicyStatus.ACTIVE)
                .values(status=PolicyStatus.ROLLED_BACK)
            )
            if not popped.rowcount:
                source = await session.get(PolicyVersion, from_id)
                active = (
                    await session.exec(select(PolicyVersion).where(PolicyVersion.status == PolicyStatus.ACTIVE))
                ).first()
                already = source is not None and source.status == PolicyStatus.ROLLED_BACK
                if already and (active.id if active is not None else None) == to_id:
                    return active
                raise PolicyChangedError(f"policy version {from_id} is no longer active; nothing was rolled back")
            if skipped:
                await session.exec(
                    update(PolicyVersion)
                    .where(col(PolicyVersion.id).in_(list(skipped)), PolicyVersion.status == PolicyStatus.RETIRED)
                    .values(status=PolicyStatus.ROLLED_BACK)
                )
            if to_id is None:
                return None
            target = await session.get(PolicyVersion, to_id)
            if target is None or target.status != PolicyStatus.RETIRED:
                raise PolicyChangedError(f"policy version {to_id} is no longer a rollback target")
            target.status = PolicyStatus.ACTIVE
            target.activated_at = utcnow()
            session.add(target)
        return target

    # --- training runs -------------------------------------------------------------------------------

    @retry_transient()
    async def start_training_run(self, *, trigger: str, config: dict[str, Any] | None = None) -> TrainingRun:
        """Record the start of an improvement run."""
        run = TrainingRun(trigger=trigger, config=config or {})
        async with self.database.session() as session:
            session.add(run)
        return run

    @retry_transient()
    async def update_training_run(self, run_id: int, **fields: Any) -> TrainingRun:
        """Update fields of a run; a terminal status sets ``finished_at``; metrics are merged."""
        async with self.database.session() as session:
            run = await session.get(TrainingRun, run_id)
            if run is None:
                raise StoreError(f"no training run {run_id}")
            metrics = fields.pop("metrics", None)
            if metrics:
                run.metrics = {**(run.metrics or {}), **metrics}
            for name, value in fields.items():
                if not hasattr(run, name):
                    raise StoreError(f"training runs have no field {name!r}")
                setattr(run, name, value)
            if "status" in fields and fields["status"] != RunStatus.RUNNING and run.finished_at is None:
                run.finished_at = utcnow()
            session.add(run)
        return run

    @retry_transient()
    async def last_training_run(self, *, finished_only: bool = False) -> TrainingRun | None:
        """The newest run."""
        async with self.database.session() as session:
            query = select(TrainingRun)
            if finished_only:
                query = query.where(TrainingRun.status != RunStatus.RUNNING)
            return (await session.exec(query.order_by(col(TrainingRun.id).desc()).limit(1))).first()

    @retry_transient()
    async def last_successful_run_time(self) -> datetime | None:
        """When the last run that used real data started: the next run takes real dialogues since then."""
        async with self.database.session() as session:
            query = (
                select(TrainingRun.started_at)
                .where(col(TrainingRun.status).in_([RunStatus.SUCCEEDED, RunStatus.REJECTED]))
                .order_by(col(TrainingRun.id).desc())
                .limit(1)
            )
            return (await session.exec(query)).first()

    @retry_transient()
    async def fail_unfinished_runs(self, error: str) -> int:
        """Mark runs left 'running' by a crashed process as failed (called at start-up)."""
        async with self.database.session() as session:
            result = await session.exec(
                update(TrainingRun)
                .where(TrainingRun.status == RunStatus.RUNNING)
                .values(status=RunStatus.FAILED, error=error, finished_at=utcnow())
            )
            return result.rowcount or 0
