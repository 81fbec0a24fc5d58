"""The contract between platform adapters and :class:`bot.service.DialogueService`.

Adapters translate: a platform event becomes a :class:`ChatRef` plus text, a command or a feedback click; the
service answers with neutral :class:`Reply` values, and each adapter owns their presentation (splitting to its
platform's length limit, feedback buttons, ephemeral and error styles).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

#: Feedback button data (:func:`encode_feedback`), as a pattern with the groups ``turn_id`` and ``vote``; Discord
#: matches clicks against it too. At most 18 digits: a turn id beyond that is not one Reverie made.
FEEDBACK_TEMPLATE = r"fb:(?P<turn_id>\d{1,18}):(?P<vote>up|down)"
_FEEDBACK_DATA = re.compile(FEEDBACK_TEMPLATE)


class FeedbackDataError(ValueError):
    """Callback/button data that Reverie did not make (forged, truncated, from another bot)."""


@dataclass(frozen=True, slots=True)
class ChatRef:
    """Who said something where: the platform, the chat and the user."""

    platform: str
    chat_id: str
    user_id: str
    user_name: str = ""
    is_group: bool = False

    @property
    def user_key(self) -> str:
        """The user as stored with their data: ``platform:user_id``."""
        return f"{self.platform}:{self.user_id}"

    @property
    def session_key(self) -> tuple[str, str, str]:
        """One conversation session per (platform, chat, user)."""
        return (self.platform, self.chat_id, self.user_id)


@dataclass(frozen=True, slots=True)
class Reply:
    """One message to send back, whole: the adapter splits it to its platform's limit (``bot.text.split_text``)."""

    #: The whole reply.
    text: str
    #: The agent turn this reply shows; adapters attach 👍/👎 to its last message when set.
    turn_id: int | None = None
    #: A refusal or notice meant only for the caller (Discord ephemeral; elsewhere a normal message).
    private: bool = False
    #: Shown with a distinct style where a platform can (errors, refusals).
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """A command as every platform registers it (``/name`` with an optional argument)."""

    name: str
    description: str
    argument: str | None = None  # e.g. "good|bad", "1-5", "text"
    admin_only: bool = False
    choices: tuple[str, ...] = field(default_factory=tuple)


def encode_feedback(turn_id: int, thumbs_up: bool) -> str:
    """Callback data for a 👍/👎 button (short: Telegram allows 64 bytes, Discord custom ids 100)."""
    return f"fb:{int(turn_id)}:{'up' if thumbs_up else 'down'}"


def decode_feedback(data: str | None) -> tuple[int, bool]:
    """``(turn_id, thumbs_up)`` from button data, or :class:`FeedbackDataError` if it is not ours."""
    match = _FEEDBACK_DATA.fullmatch(data or "")
    if match is None:
        raise FeedbackDataError(f"not a feedback button: {str(data)[:80]!r}")
    return int(match["turn_id"]), match["vote"] == "up"


class Improver(Protocol):
    """What admin commands need of the improvement loop (``bot/improve``)."""

    async def request_run(self, *, trigger: str, requested_by: str) -> str:
        """Start an improvement run in the background; returns a message for the admin."""
        ...

    async def rollback(self, *, requested_by: str) -> str:
        """Swap back to the previous policy version; returns a message for the admin."""
        ...

    async def status_lines(self) -> list[str]:
        """Lines for ``/status``: active version and metrics, last run, schedule."""
        ...
