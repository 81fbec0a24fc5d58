"""The agent's notes: what the user has said so far, written under each user message the policy reads.

A small model that must read "Full sun most of the day" as *direct sun* from a few thousand imagined dialogues
learns the phrasings it saw, not the task (held-out phrasings were misread in 68 of 77 final acts on
houseplants). So every policy — the prompted base model, BC, filtered BC, ILQL, critic-AWR — reads each user turn
with a one-line note the task's own words produce: the values read so far and the preferences still open, and once
none is open the task file's phrases that honour those values without clashing (``fits`` and ``clashes``: the
task's catalogue, which a 135 M model does not learn by heart from a few thousand dialogues either — with the
values alone, critic-awr recommended the same cast-iron plant to most customers). The
note is computed from the history up to that message only, so a rendered history only ever grows (the prefix cache
and the training sequences see the same tokens the bot later does), and training and serving share this one
function.

The reader is the task world's (:meth:`imagine.world.TaskWorld.known_from_history`) restricted to the
*training* phrasings: a held-out phrasing is read from the task file's ``words`` and value names or not at all,
and whatever the reader misses the policy still sees in the user's own text.
"""

from __future__ import annotations

from collections.abc import Sequence

from imagine.task import TaskSpec
from imagine.world import TaskWorld, TaskWorldError, world_for
from learning.interface import Message


def task_world(task: TaskSpec) -> TaskWorld | None:
    """The world whose reader writes the notes, or ``None`` for a task whose world does not compile (no notes)."""
    try:
        return world_for(task)
    except TaskWorldError:
        return None


def note(world: TaskWorld, history: Sequence[Message]) -> str:
    """The note after the last message of ``history``: e.g. ``(Noted: light = direct sun. To ask: pets.)``; once
    nothing is left to ask, the task file's phrases that honour every value and clash with none follow; a side
    question of the task's not yet answered comes with the task file's answer (behind the reply guard, every
    houseplants failure read was such a question asked five times and never answered)."""
    known = world.known_from_history(history, phrasings="train")
    heard = "; ".join(f"{name} = {known[name]}" for name in world.attribute_names if name in known)
    open_ = [a.name for a in world.preferences if a.name not in known]
    parts = [f"Noted: {heard}." if heard else "Noted: nothing yet."]
    if open_:
        parts.append(f"To ask: {', '.join(open_)}.")
    else:
        parts.append("To ask: nothing.")
        options = world.fitting_options(known)
        if options:
            parts.append("Fits them: " + "; ".join(" or ".join(choices) for choices in options.values()) + ".")
    side = world.pending_side_question(history)
    if side is not None:
        parts.append(f"They asked: {side.question} Answer: {side.answer}")
    return "(" + " ".join(parts) + ")"


def with_notes(task: TaskSpec, history: Sequence[Message]) -> list[Message]:
    """``history`` with the note appended to every user message (unchanged when the task has no world)."""
    world = task_world(task)
    if world is None:
        return list(history)
    annotated: list[Message] = []
    for index, message in enumerate(history):
        if message.role == "user":
            message = Message("user", f"{message.text}\n{note(world, history[: index + 1])}")
        annotated.append(message)
    return annotated
