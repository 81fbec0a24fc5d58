"""Simulated users with hidden personas (scripted and LLM-driven) and scripted behaviour agents.

Scripted users make evaluation objective and offline; scripted behaviour agents produce the ``scripted``
source of suboptimal imagined dialogues used by benchmarks and tests.
"""

from imagine.simulated.base import (
    SCRIPTED_REWARD_SOURCE,
    Attribute,
    FinalAct,
    MessageLike,
    ScriptedTask,
    ScriptedUser,
    SimulatedUser,
    UserTurn,
    Utterance,
    stable_rng,
)
from imagine.simulated.behaviour import (
    BEHAVIOURS,
    DEFAULT_MIX,
    Behaviour,
    BehaviourPolicy,
    generate_and_save,
    generate_scripted_dialogues,
    play_scripted_episode,
    save_scripted_dialogues,
)
from imagine.simulated.llm_user import LLM_REWARD_SOURCE, ChatCompleter, LLMUser
from imagine.simulated.registry import opening_line, scripted_task, scripted_tasks

__all__ = [
    "BEHAVIOURS",
    "DEFAULT_MIX",
    "LLM_REWARD_SOURCE",
    "SCRIPTED_REWARD_SOURCE",
    "Attribute",
    "Behaviour",
    "BehaviourPolicy",
    "ChatCompleter",
    "FinalAct",
    "LLMUser",
    "MessageLike",
    "ScriptedTask",
    "ScriptedUser",
    "SimulatedUser",
    "UserTurn",
    "Utterance",
    "generate_and_save",
    "generate_scripted_dialogues",
    "opening_line",
    "play_scripted_episode",
    "save_scripted_dialogues",
    "scripted_task",
    "scripted_tasks",
    "stable_rng",
]
