"""A task's world, compiled from its TOML: simulated users, scripted agents and the judge of the final act.

:func:`world_for` turns any :class:`imagine.task.TaskSpec` into a :class:`TaskWorld` offline, in well under a
second: personas over every value the persona hints name, users who answer in many phrasings (some held out),
volunteer values, answer vaguely, say "you pick" or ask a side question, and a judge that checks each value is
honoured and nothing clashes. Imagination (the ``scripted`` source), evaluation, the promotion gate and the
training probe all run on it, for the built-in tasks and for a user's own TOML alike.
"""

from imagine.world.compile import TaskWorldError, world_for
from imagine.world.splits import HELD_OUT_COMBINATIONS, Split, split_items
from imagine.world.user import WorldUser
from imagine.world.world import ANY, SideQuestion, TaskWorld, WorldAttribute, WorldValue

__all__ = [
    "ANY",
    "HELD_OUT_COMBINATIONS",
    "SideQuestion",
    "Split",
    "TaskWorld",
    "TaskWorldError",
    "WorldAttribute",
    "WorldUser",
    "WorldValue",
    "split_items",
    "world_for",
]
