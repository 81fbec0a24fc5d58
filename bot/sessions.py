"""In-memory conversation sessions, one per (platform, chat, user).

A session is a cache of what the database already holds (the open conversation and its recent turns)
plus the lock that keeps that user's turns in order. Losing it loses nothing: after a restart the
service rebuilds it from the open conversation in the database, and before every use it is checked against the
database, so replicas behind a load balancer continue one conversation whichever of them gets the next message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from learning.interface import Message

SessionKey = tuple[str, str, str]

#: The most recent messages a policy sees; older ones stay in the database.
HISTORY_MAX_MESSAGES = 16
#: Character budget of the history window: with the system prompt and the reply it fits a 2 k-token context.
HISTORY_MAX_CHARS = 3000


@dataclass
class Session:
    """One user's conversation state in one chat."""

    key: SessionKey
    last_active: datetime
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The open conversation, or ``None`` between conversations.
    conversation_id: int | None = None
    #: The conversation ``/rate`` and ``/feedback`` apply to: the open one, else the last one closed.
    last_conversation_id: int | None = None
    history: list[Message] = field(default_factory=list)
    agent_turns: int = 0
    #: How many turns of the open conversation the database holds as far as this session knows: another replica
    #: that stored one more shows as a larger count there (:meth:`DialogueService._sync`).
    stored_turns: int = 0
    #: Whether the database was checked for a conversation left open by an earlier process.
    resumed: bool = False

    def open(self, conversation_id: int) -> None:
        """Start tracking a newly opened conversation."""
        self.conversation_id = conversation_id
        self.last_conversation_id = conversation_id
        self.history.clear()
        self.agent_turns = 0
        self.stored_turns = 0

    def close(self) -> None:
        """Forget the open conversation (it stays rateable as ``last_conversation_id``)."""
        self.conversation_id = None
        self.history.clear()
        self.agent_turns = 0
        self.stored_turns = 0

    def add(self, message: Message) -> None:
        """Remember a turn stored in the open conversation, keeping only as many as a window can use."""
        self.history.append(message)
        self.stored_turns += 1
        if message.role == "agent":
            self.agent_turns += 1
        del self.history[: -HISTORY_MAX_MESSAGES * 2]


def history_window(
    history: list[Message], max_messages: int = HISTORY_MAX_MESSAGES, max_chars: int = HISTORY_MAX_CHARS
) -> list[Message]:
    """The most recent messages that fit the budget; the newest is always kept (its tail if it is too long)."""
    window: list[Message] = []
    used = 0
    for message in reversed(history[-max_messages:]):
        if window and used + len(message.text) > max_chars:
            break
        if not window and len(message.text) > max_chars:
            message = Message(role=message.role, text=message.text[-max_chars:])
        window.append(message)
        used += len(message.text)
    window.reverse()
    return window
