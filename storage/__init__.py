"""Reverie's data: SQLModel tables, engine set-up, queries and migrations.

Depends on nothing else in Reverie.
"""

from storage.database import Database, DatabaseUnavailableError, redacted
from storage.models import (
    Conversation,
    ConversationStatus,
    DataDeletion,
    Feedback,
    FeedbackKind,
    Platform,
    PolicyStatus,
    PolicyVersion,
    Role,
    RunStatus,
    Source,
    TrainingRun,
    Turn,
    utcnow,
)
from storage.store import DialogueRecord, Store, StoreError, TurnRecord

__all__ = [
    "Conversation",
    "ConversationStatus",
    "DataDeletion",
    "Database",
    "DatabaseUnavailableError",
    "DialogueRecord",
    "Feedback",
    "FeedbackKind",
    "Platform",
    "PolicyStatus",
    "PolicyVersion",
    "Role",
    "RunStatus",
    "Source",
    "Store",
    "StoreError",
    "TrainingRun",
    "Turn",
    "TurnRecord",
    "redacted",
    "utcnow",
]
