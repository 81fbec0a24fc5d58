"""The last look at a reply before it is sent: never degenerate text, never a question the user already answered.

A small policy fed an odd message (a 2,000-character word, another script, code, an emoji flood, an injection)
can answer with fragments ("The_N. The originalx is the_NNDoC…"), loops or leaked role markers. :func:`degenerate`
names what is wrong with such a text; :class:`ReplyGuard` then sends a safe clarifying question instead. Where the
task's world compiles (:func:`imagine.world.world_for`) the guard also listens: a reply that only asks for values
the user has already given is replaced by a question about one still unknown, or, when none is, by the recommendation
the task's catalogue gives for what the user said (:meth:`TaskWorld.compose_act`); and it answers: a side question
of the task's that the reply leaves unanswered ("Does it come with a pot?") gets the task file's answer first, then
the reply where it moves the conversation on (asks something still open, or acts), else a question still open. Every
replacement is logged.
"""

from __future__ import annotations

import logging
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from imagine.conversation import MessageLike
from imagine.task import TaskSpec
from imagine.world import TaskWorld, TaskWorldError, world_for

logger = logging.getLogger(__name__)

#: What the guard says when the task has no world to ask a better question from.
GENERIC_CLARIFICATION = "Sorry, I didn't quite get that. Could you tell me a bit more about what you're looking for?"

#: Longest word; longer ones are glued fragments (a URL is allowed).
MAX_WORD_CHARS = 28
#: Smallest share of tokens that must look like words of a sentence.
MIN_WORDLIKE_SHARE = 0.75

_TOKEN = re.compile(r"\S+")
#: A word in any script (letters, inner hyphens or apostrophes), a number, or a short acronym, with punctuation.
_WORDLIKE = re.compile(r"^[\"'(\[¿¡]*(?:[^\W\d_]+(?:[-'’][^\W\d_]+)*|\d+(?:[.,:/]\d+)*%?|[&\-—–])[\"')\].,!?;:…]*$")
#: A lower-case letter followed by an upper-case one inside a word ("originalX", "NNDoC"): glued fragments.
_CAMEL = re.compile(r"[a-z][A-Z]")
_ROLE_MARKER = re.compile(
    r"<\|[a-z_]+\|>|^\s*(?:user|assistant|system|agent|customer)\s*:", re.IGNORECASE | re.MULTILINE
)
_URL = re.compile(r"^https?://\S+$")


def degenerate(text: str) -> str | None:
    """Why ``text`` must not be sent (``None``: it may): empty, a role marker, a glued word, mostly non-words, or
    a loop. Length is bounded where the text is made (``MAX_NEW_TOKENS``), and adapters split long replies."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if _ROLE_MARKER.search(stripped):
        return "role marker"
    tokens = _TOKEN.findall(stripped)
    if any(len(t) > MAX_WORD_CHARS and not _URL.match(t) for t in tokens):
        return "overlong word"
    wordlike = sum(1 for t in tokens if _is_wordlike(t))
    if wordlike / len(tokens) < MIN_WORDLIKE_SHARE:
        return "not words"
    words = [t.lower().strip(".,!?;:\"'()") for t in tokens]
    if len(words) >= 8:
        # a loop: one three-word phrase three times or more, making up a tenth of the text
        trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
        count = trigrams.most_common(1)[0][1]
        if count >= 3 and count >= 0.1 * (len(words) - 2):
            return "repeats itself"
    if any(a == b == c for a, b, c in zip(words, words[1:], words[2:], strict=False) if a):
        return "repeats itself"
    return None


def _is_wordlike(token: str) -> bool:
    token = "".join(c for c in token if unicodedata.category(c) != "Cf")  # direction marks, joiners
    if token and len(token) <= 3 and all(unicodedata.category(c) in ("So", "Sk", "Sm") for c in token):
        return True  # an emoji or a symbol on its own
    return bool(_WORDLIKE.match(token)) and not _CAMEL.search(token.lstrip("\"'(").removeprefix("Mc").removeprefix("i"))


@dataclass(frozen=True)
class Review:
    """What the guard decided about one reply: the text to send and, when it replaced the policy's, why."""

    text: str
    replaced: str | None = None


class ReplyGuard:
    """Reviews a policy's reply in its conversation (see the module docstring)."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        try:
            self.world: TaskWorld | None = world_for(task)
        except TaskWorldError:
            self.world = None

    def review(self, history: Sequence[MessageLike], reply: str) -> Review:
        """The reply to send after ``history`` (which ends with the user's message)."""
        reason = degenerate(reply)
        if reason is not None:
            return Review(self.clarify(history), f"degenerate reply ({reason})")
        if self.world is None:
            return Review(reply)
        world, rng = self.world, random.Random(len(history))
        asked = world.asked_attributes(reply)
        acts = world.final_act(reply) is not None
        # read as the agent's notes read (training phrasings and the task's words), never as the judge does
        known = world.known_from_history(history, phrasings="train")
        text, reasons = reply, []
        if asked and all(name in known for name in asked) and not acts:
            # nothing left to ask: the recommendation the task's catalogue gives for what was said
            text = world.next_move(known, rng)
            reasons.append(f"re-asked {', '.join(asked)}, already given")
        side = world.pending_side_question(history)
        if side is not None and not side.is_informed_by(text):
            # what follows the answer moves the conversation on: the reply's act or (already chosen) question, or
            # the world's wording of the question the reply asked (its other sentences may answer wrongly)
            open_asked = [name for name in asked if name not in known]
            if reasons or acts:
                follow = text
            elif open_asked:
                follow = world.ask(open_asked[0], rng)
            else:
                follow = world.next_move(known, rng)
            text = f"{side.reply()} {follow}"
            reasons.append(f"left {side.question!r} unanswered")
        return Review(text, "; ".join(reasons) or None)

    def clarify(self, history: Sequence[MessageLike]) -> str:
        """A safe reply that moves the conversation on."""
        if self.world is None:
            return GENERIC_CLARIFICATION
        return self.world.clarifying_reply(history, random.Random(len(history)))
