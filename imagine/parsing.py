"""Turning an LLM's free-form dialogue (and its JSON) into clean alternating turns, or a counted rejection.

LLMs label speakers in many ways (``User:``, ``**Traveller:**``, ``1. Agent -``, ``[Tutor]``, a persona's
first name), wrap the dialogue in prose or markdown fences, split a turn over several lines, let one
speaker talk twice or forget the opening line. :func:`parse_dialogue` repairs what it safely can and
raises :class:`DialogueParseError` with a short machine-readable ``reason`` for everything else, so the
engine can count rejections by cause instead of crashing a batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

USER, AGENT = "user", "agent"

GENERIC_USER_LABELS = ("user", "human", "customer", "client", "person", "persona", "visitor", "me")
GENERIC_AGENT_LABELS = ("agent", "assistant", "ai", "bot", "chatbot", "system agent", "you")

# A speaker label at the start of a line, after optional list markers / markdown:
#   "User: hi", "**User:** hi", "- Agent: hi", "3. User - hi", "[Tutor] hi", "Turn 2 (User): hi"
_LABEL = re.compile(
    r"""^\s*
    (?:[-*•>#]+\s*|\d{1,3}\s*[.)]\s*|turn\s*\d+\s*[:.)-]?\s*)*      # list markers, numbering, 'Turn 3'
    [*_`]*\s*[\[(]?\s*
    (?P<label>[A-Za-z][A-Za-z .'’-]{0,28}?)                          # the speaker name (1-4 words)
    (?:\s*\d{1,2})?                                                  # 'User 1'
    \s*[\])]?\s*[*_`]*\s*
    (?:[:：]|\s[-–—]\s|(?<=[\])])\s)                                 # ':'  ' - '  or after a bracket
    [*_`]*\s*(?P<text>.*)$""",
    re.VERBOSE | re.IGNORECASE,
)
_FENCE = re.compile(r"^\s*```")
_SEPARATOR = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,}|={3,})\s*$")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_)(.+?)\1")
_STAGE_DIRECTION = re.compile(r"^\s*[\[(][^\])]{0,60}[\])]\s*$")  # '(smiles)' alone on a line


class DialogueParseError(ValueError):
    """The text is not a usable dialogue; ``reason`` is a short key for counting (e.g. ``too_short``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ParsedDialogue:
    """Alternating turns starting with the agent, and the repairs made to get there."""

    turns: tuple[tuple[str, str], ...]
    repairs: tuple[str, ...] = field(default=())

    @property
    def agent_turns(self) -> int:
        """How many turns the agent speaks."""
        return sum(1 for role, _ in self.turns if role == AGENT)


def normalise_label(label: str) -> str:
    """Lower case, single spaces, no punctuation: 'Travel-Agent ' → 'travel agent'."""
    return " ".join(re.sub(r"[^a-z ]", " ", label.lower().replace("’", "'")).split())


def parse_dialogue(
    text: str,
    *,
    user_labels: tuple[str, ...] | list[str] = (),
    agent_labels: tuple[str, ...] | list[str] = (),
    opening_line: str | None = None,
    min_agent_turns: int = 2,
    min_user_turns: int = 1,
    max_agent_turns: int | None = None,
    max_turn_chars: int = 1200,
) -> ParsedDialogue:
    """Parse a labelled dialogue into alternating ``(role, text)`` turns that start with the agent.

    Repairs: markdown and list markers are stripped, multi-line turns are joined, consecutive turns of one
    speaker are merged, a missing opening line is put back (when ``opening_line`` is given), one unknown
    recurring label (a persona's name) is taken for whichever side has no label. Everything else raises
    :class:`DialogueParseError`.
    """
    if not text or not text.strip():
        raise DialogueParseError("empty", "no text")
    users = {normalise_label(x) for x in (*GENERIC_USER_LABELS, *user_labels)}
    agents = {normalise_label(x) for x in (*GENERIC_AGENT_LABELS, *agent_labels)}
    lines = _dialogue_lines(text)
    labelled = [(_LABEL.match(line), line) for line in lines]
    counts: dict[str, int] = {}
    for match, _ in labelled:
        if match:
            key = normalise_label(match.group("label"))
            counts[key] = counts.get(key, 0) + 1
    roles = _assign_roles(counts, users, agents)
    if not roles:
        raise DialogueParseError("no_speaker_labels", "no line starts with a known speaker label")

    repairs: list[str] = []
    raw: list[list[str]] = []  # [role, text]
    for match, line in labelled:
        role = roles.get(normalise_label(match.group("label"))) if match else None
        if role is not None and match is not None:
            raw.append([role, match.group("text")])
        elif raw and line.strip() and not _STAGE_DIRECTION.match(line):
            raw[-1][1] += " " + line.strip()  # a turn that goes on over several lines
    turns: list[tuple[str, str]] = []
    for role, turn_text in raw:
        cleaned = clean_turn_text(turn_text)
        if not cleaned:
            repairs.append("dropped_empty_turn")
            continue
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]} {cleaned}")
            repairs.append("merged_same_speaker")
        else:
            turns.append((role, cleaned))
    if not turns:
        raise DialogueParseError("empty", "labels but no words")
    if turns[0][0] == USER:
        if opening_line is None:
            raise DialogueParseError("starts_with_user", "the agent must speak first")
        turns.insert(0, (AGENT, opening_line))
        repairs.append("added_opening_line")
    agent_count = sum(1 for role, _ in turns if role == AGENT)
    user_count = len(turns) - agent_count
    if agent_count < min_agent_turns or user_count < min_user_turns:
        raise DialogueParseError("too_short", f"{agent_count} agent and {user_count} user turns")
    if max_agent_turns is not None and agent_count > max_agent_turns:
        raise DialogueParseError("too_long", f"{agent_count} agent turns, at most {max_agent_turns}")
    longest = max(len(t) for _, t in turns)
    if longest > max_turn_chars:
        raise DialogueParseError("turn_too_long", f"a turn of {longest} characters")
    return ParsedDialogue(turns=tuple(turns), repairs=tuple(repairs))


def _dialogue_lines(text: str) -> list[str]:
    """The lines between code fences if there are any, else all; a separator after turns ends the dialogue."""
    lines = text.replace("\r\n", "\n").split("\n")
    fenced = [i for i, line in enumerate(lines) if _FENCE.match(line)]
    if len(fenced) >= 2:
        lines = lines[fenced[0] + 1 : fenced[1]]
    out: list[str] = []
    for line in lines:
        if _SEPARATOR.match(line) and any(_LABEL.match(seen) for seen in out):
            break
        out.append(line)
    return out


def _assign_roles(counts: dict[str, int], users: set[str], agents: set[str]) -> dict[str, str]:
    roles = {label: USER for label in counts if label in users}
    roles.update({label: AGENT for label in counts if label in agents})
    # A label that recurs but is unknown is most likely the persona's (or the agent's) first name.
    unknown = [label for label, n in counts.items() if label not in roles and n >= 2 and len(label.split()) <= 2]
    if len(unknown) == 1:
        present = set(roles.values())
        if USER not in present:
            roles[unknown[0]] = USER
        elif AGENT not in present:
            roles[unknown[0]] = AGENT
    elif len(unknown) == 2 and not roles:
        # Two names and nothing else: whoever speaks second answers the agent's opening.
        first, second = sorted(unknown, key=lambda label: list(counts).index(label))
        roles = {first: AGENT, second: USER}
    return roles


def clean_turn_text(text: str) -> str:
    """One turn's words: no markdown emphasis, no wrapping quotes, no stray labels, single spaces."""
    text = _EMPHASIS.sub(r"\2", text)
    text = text.replace("**", "").replace("__", "")
    text = " ".join(text.split()).strip()
    if len(text) >= 2 and text[0] in "\"“'" and text[-1] in "\"”'":
        text = text[1:-1].strip()
    return text


def single_turn(text: str, *, labels: tuple[str, ...] | list[str] = (), max_chars: int = 400) -> str:
    """A small model's reply cut to one clean turn: first paragraph, no speaker label, at most ``max_chars``.

    Turn-by-turn imagination uses this; a model that starts writing the other side's lines is cut there.
    """
    known = {normalise_label(x) for x in (*GENERIC_USER_LABELS, *GENERIC_AGENT_LABELS, *labels)}
    kept: list[str] = []
    for index, line in enumerate(text.replace("\r\n", "\n").split("\n")):
        if not line.strip():
            if kept:
                break
            continue
        match = _LABEL.match(line)
        if match and normalise_label(match.group("label")) in known:
            if index > 0 and kept:
                break  # the model went on to write the next speaker's turn
            line = match.group("text")
        kept.append(line)
    cleaned = clean_turn_text(" ".join(kept))
    # A reply cut off by the token limit ends mid-sentence: keep the complete sentences before it.
    if cleaned and cleaned[-1] not in '.!?…"”)':
        end = max(cleaned.rfind(". "), cleaned.rfind("? "), cleaned.rfind("! "))
        if end >= 10:
            cleaned = cleaned[: end + 1]
    if len(cleaned) > max_chars:
        cut = cleaned[:max_chars]
        end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
        cleaned = cut[: end + 1] if end > max_chars // 3 else cut.rstrip() + "…"
    return cleaned


def extract_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (fences, prose and trailing commas tolerated).

    Raises :class:`DialogueParseError` (reason ``bad_json``) when there is none.
    """
    if not text or not text.strip():
        raise DialogueParseError("bad_json", "empty reply")
    stripped = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text.strip())
    for candidate in (stripped, *_balanced_blocks(stripped)):
        for attempt in (candidate, re.sub(r",\s*([}\]])", r"\1", candidate)):
            try:
                return json.loads(attempt)
            except json.JSONDecodeError:
                continue
    raise DialogueParseError("bad_json", f"no JSON object in {text[:80]!r}")


def _balanced_blocks(text: str) -> list[str]:
    """Substrings from each '{' or '[' to its matching bracket, outermost first (strings respected)."""
    blocks: list[str] = []
    for start, char in enumerate(text):
        if char not in "{[" or len(blocks) >= 8:
            continue
        closing = "}" if char == "{" else "]"
        depth, in_string, escaped = 0, False, False
        for end in range(start, len(text)):
            c = text[end]
            if in_string:
                escaped = c == "\\" and not escaped
                if c == '"' and not escaped:
                    in_string = False
                continue
            if c == '"':
                in_string = True
            elif c == char:
                depth += 1
            elif c == closing:
                depth -= 1
                if depth == 0:
                    blocks.append(text[start : end + 1])
                    break
    return blocks


def fingerprint(turns: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """A short hash of a dialogue's words (case and spacing ignored): equal for duplicates."""
    canonical = "\n".join(f"{role}:{' '.join(text.lower().split())}" for role, text in turns)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
