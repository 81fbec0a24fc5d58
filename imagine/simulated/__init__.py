"""Simulated users with hidden personas and scripted behaviour agents.

Users of a task's compiled world (:mod:`imagine.world`) make evaluation objective and offline for every task;
LLM-driven users (:class:`LLMUser`) talk freely on a configured server; scripted behaviour agents produce the
``scripted`` source of suboptimal imagined dialogues.
"""

from imagine.conversation import (
    SCRIPTED_REWARD_SOURCE,
    FinalAct,
    MessageLike,
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

__all__ = [
    "BEHAVIOURS",
    "DEFAULT_MIX",
    "LLM_REWARD_SOURCE",
    "SCRIPTED_REWARD_SOURCE",
    "Behaviour",
    "BehaviourPolicy",
    "ChatCompleter",
    "FinalAct",
    "LLMUser",
    "MessageLike",
    "SimulatedUser",
    "UserTurn",
    "Utterance",
    "generate_and_save",
    "generate_scripted_dialogues",
    "play_scripted_episode",
    "save_scripted_dialogues",
    "stable_rng",
]
