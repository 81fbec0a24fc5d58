"""Text hygiene for chat messages: sanitising what users send and splitting what the bot sends.

Both are pure functions, so every adapter and the service agree on them and tests can pin them down.
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 control characters except tab and newline; DEL counts as a control too.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# Where a chunk may end, best first: after a paragraph break, a line break, a sentence, a word.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n\s*"),
    re.compile(r"(?<=[.!?…。！？])[\"')\]»”’]*\s+"),
    re.compile(r"\s+"),
)


def sanitize(text: str) -> str:
    """NFC-normalised text without control characters (newline and tab kept), stripped at both ends.

    Carriage returns become newlines rather than vanishing, so ``a\\r\\nb`` and ``a\\rb`` keep their line
    break. Right-to-left text, emoji, zero-width joiners and other format characters are left intact.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", _CONTROLS.sub("", text)).strip()


def split_text(text: str, limit: int) -> tuple[str, ...]:
    """Cut ``text`` into chunks of at most ``limit`` characters, on the most natural boundary that fits.

    Prefers paragraph breaks, then line breaks, then sentence ends, then spaces, and only cuts inside a
    word when a single word is longer than ``limit`` (never between a character and its combining
    marks). The chunks concatenate back to ``text``, except that whitespace-only chunks are dropped.
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, not {limit}")
    chunks: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = _best_cut(rest, limit)
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    return tuple(chunk for chunk in chunks if chunk.strip())


def _best_cut(text: str, limit: int) -> int:
    """Where to end the next chunk of ``text`` (``0 < cut <= limit``)."""
    window = text[:limit]
    fallback = 0
    for boundary in _BOUNDARIES:
        ends = [match.end() for match in boundary.finditer(window) if match.start() > 0]
        if not ends:
            continue
        # A boundary in the first half makes a stubby chunk: try a finer boundary before accepting it.
        if ends[-1] >= limit // 2:
            return ends[-1]
        fallback = max(fallback, ends[-1])
    if fallback:
        return fallback
    return _hard_cut(text, limit)


def _hard_cut(text: str, limit: int) -> int:
    """Cut inside a word, but not before a combining mark, joiner or variation selector."""
    cut = limit
    while cut > 1 and (_binds_to_previous(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    return cut


def _binds_to_previous(char: str) -> bool:
    return (
        unicodedata.combining(char) != 0
        or unicodedata.category(char) in ("Mn", "Me", "Mc")
        or char in "\u200d\ufe0e\ufe0f"
        or "\U0001f3fb" <= char <= "\U0001f3ff"  # skin-tone modifiers
    )
