"""SQLModel tables (docs/architecture.md, "Data model").

Imagined, evaluation and real dialogues share :class:`Conversation` and :class:`Turn`, so mixing them
for training is one query. All times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, DateTime, ForeignKey, Index, Integer, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC that always reads back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: Reverie stores timezone-aware UTC times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Source(StrEnum):
    """Where a conversation came from."""

    REAL = "real"
    IMAGINED = "imagined"
    EVALUATION = "evaluation"


class Platform(StrEnum):
    """Which channel carried a conversation."""

    DISCORD = "discord"
    TELEGRAM = "telegram"
    CONSOLE = "console"
    IMAGINED = "imagined"
    SIM = "sim"


class Role(StrEnum):
    """Who spoke a turn."""

    USER = "user"
    AGENT = "agent"


class ConversationStatus(StrEnum):
    """Life cycle of a conversation."""

    OPEN = "open"
    CLOSED = "closed"  # ended with or without a reward
    EXPIRED = "expired"  # idle timeout: closed without reward


class FeedbackKind(StrEnum):
    """Kinds of user feedback."""

    THUMBS = "thumbs"
    RATING = "rating"
    TEXT = "text"


class PolicyStatus(StrEnum):
    """Life cycle of a trained policy."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"  # left by /rollback: never comes back by another rollback


class RunStatus(StrEnum):
    """Life cycle of an improvement/training run."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"  # candidate promoted
    REJECTED = "rejected"  # trained fine, but not better than the active policy
    FAILED = "failed"
    CANCELLED = "cancelled"


class PolicyVersion(SQLModel, table=True):
    """A trained policy checkpoint and its place in the promotion history."""

    id: int | None = Field(default=None, primary_key=True)
    path: str
    sha256: str = Field(max_length=64)
    base_model: str
    algorithm: str
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default=PolicyStatus.CANDIDATE, index=True, max_length=16)
    parent_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("policyversion.id", ondelete="SET NULL"))
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    activated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Conversation(SQLModel, table=True):
    """One episode: a real chat, an imagined dialogue or an evaluation episode."""

    __table_args__ = (
        Index("ix_conversation_training", "source", "ended_at"),
        Index("ix_conversation_idempotency_key", "idempotency_key", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(index=True, max_length=16)
    platform: str = Field(max_length=16)
    task: str = Field(index=True, max_length=64)
    chat_key: str = Field(default="", max_length=128)
    user_key: str = Field(default="", index=True, max_length=128)
    persona: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    policy_version_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("policyversion.id", ondelete="SET NULL"))
    )
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    status: str = Field(default=ConversationStatus.OPEN, max_length=16)
    reward: float | None = None
    reward_source: str | None = Field(default=None, max_length=32)
    consent: bool = Field(default=True, description="May this conversation be used for training?")
    #: Set by the writer before its first attempt, so a retry after a lost commit acknowledgement finds
    #: the row it already wrote instead of writing a second one.
    idempotency_key: str | None = Field(default=None, max_length=64)


class Turn(SQLModel, table=True):
    """One utterance of a conversation."""

    __table_args__ = (
        UniqueConstraint("conversation_id", "index", name="uq_turn_position"),
        Index("ix_turn_idempotency_key", "idempotency_key", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(
        sa_column=Column(Integer, ForeignKey("conversation.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    index: int
    role: str = Field(max_length=8)
    text: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    policy_version_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("policyversion.id", ondelete="SET NULL"))
    )
    latency_ms: float | None = None
    idempotency_key: str | None = Field(default=None, max_length=64)  # see Conversation.idempotency_key


class Feedback(SQLModel, table=True):
    """Feedback on a turn (👍/👎) or on a whole conversation (rating, text)."""

    __table_args__ = (
        UniqueConstraint("turn_id", "user_key", "kind", name="uq_feedback_once"),
        Index("ix_feedback_idempotency_key", "idempotency_key", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(
        sa_column=Column(Integer, ForeignKey("conversation.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    turn_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("turn.id", ondelete="CASCADE"), nullable=True)
    )
    user_key: str = Field(index=True, max_length=128)
    kind: str = Field(max_length=16)
    value: float | None = None
    text: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    idempotency_key: str | None = Field(default=None, max_length=64)  # see Conversation.idempotency_key


class TrainingRun(SQLModel, table=True):
    """One improvement run: imagine → mix → train → evaluate → gate → swap."""

    id: int | None = Field(default=None, primary_key=True)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    status: str = Field(default=RunStatus.RUNNING, index=True, max_length=16)
    trigger: str = Field(default="schedule", max_length=16)
    n_imagined: int = 0
    n_real: int = 0
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    candidate_version_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("policyversion.id", ondelete="SET NULL"))
    )
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class DataDeletion(SQLModel, table=True):
    """A ``/forget`` tombstone: training runs already under way drop this user's dialogues too."""

    __table_args__ = (Index("ix_datadeletion_idempotency_key", "idempotency_key", unique=True),)

    id: int | None = Field(default=None, primary_key=True)
    user_key: str = Field(index=True, max_length=128)
    deleted_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    conversations: int = 0
    #: Ids of the deleted conversations: files written before the deletion (run inputs, exports) carry these
    #: ids, so any process can still find and remove the user's dialogues in them later.
    conversation_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    idempotency_key: str | None = Field(default=None, max_length=64)  # see Conversation.idempotency_key


class ExportFile(SQLModel, table=True):
    """A file of dialogues the project wrote (``reverie dialogues export --out``): ``/forget`` rewrites it."""

    __table_args__ = (UniqueConstraint("path", name="uq_exportfile_path"),)

    id: int | None = Field(default=None, primary_key=True)
    path: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
