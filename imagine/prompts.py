"""The prompts of the imagination pipeline, one function per step; each returns OpenAI-format messages.

Whole-dialogue prompts (a capable LLM writes the dialogue in one go) follow the paper's three steps:
personas (reasoning), reward-conditioned dialogue (imagination), critique and revision. Turn prompts
let a small local model play one side at a time.
"""

from __future__ import annotations

import json
from typing import Any

from imagine.task import TaskSpec

PROMPT_VERSION = "1"
ChatMessages = list[dict[str, str]]


def outcome_text(task: TaskSpec, reward: int) -> str:
    """What the dialogue's ending must look like for outcome ``reward``."""
    return f"SUCCESS: {task.success}" if reward else f"FAILURE: {task.failure}"


def persona_summary(persona: dict[str, Any]) -> str:
    """A persona as one line for prompts: its description and attributes."""
    attributes = persona.get("attributes") or {}
    details = "; ".join(f"{key}: {value}" for key, value in attributes.items())
    description = str(persona.get("description") or "").strip()
    name = str(persona.get("name") or "").strip()
    parts = [f"Name: {name}." if name else "", description, f"({details})" if details else ""]
    return " ".join(p for p in parts if p)


def persona_messages(task: TaskSpec, count: int, avoid: list[str]) -> ChatMessages:
    """Step 1 (reasoning): ask for ``count`` diverse personas as JSON."""
    hints = "\n".join(f"- {hint}" for hint in task.persona_hints)
    avoid_text = ""
    if avoid:
        avoid_text = "\nThese personas exist already; make yours clearly different:\n" + "\n".join(
            f"- {a}" for a in avoid[-20:]
        )
    schema = {
        "personas": [
            {
                "name": "a first name",
                "attributes": {"<dimension>": "<value>"},
                "description": "two sentences, third person",
            }
        ]
    }
    return [
        {
            "role": "system",
            "content": "You invent realistic, varied user personas for dialogue research. Reply in JSON.",
        },
        {
            "role": "user",
            "content": (
                f"Task: {task.title}. The agent is {task.agent_role}; the user is {task.user_role}.\n"
                f"Users differ along these dimensions:\n{hints}\n"
                f"Invent {count} personas that cover different combinations; give each a value for every "
                f"dimension.{avoid_text}\nReply with JSON only, in this form: {json.dumps(schema)}"
            ),
        },
    ]


def dialogue_messages(task: TaskSpec, persona: dict[str, Any], reward: int) -> ChatMessages:
    """Step 2 (imagination): one dialogue conditioned on the persona and the outcome."""
    return [
        {
            "role": "system",
            "content": "You write realistic conversations between people, as plain text with speaker labels.",
        },
        {
            "role": "user",
            "content": (
                f"Write a conversation between {task.agent_role} (label 'Agent') and {task.user_role} "
                f"(label 'User').\nThe agent's goal: {task.agent_goal}\n"
                f"The user's hidden persona (the agent does not know it): {persona_summary(persona)}\n"
                f"Outcome of this conversation — {outcome_text(task, reward)}\n"
                f'Rules: the agent speaks first and opens with exactly: "{task.opening_line}". Turns alternate '
                f"strictly, one line each, starting with 'Agent:' or 'User:'. At most {task.max_turns} agent turns. "
                "The agent is a plausible human, not perfect. The user reveals the persona gradually. "
                "Keep every turn short. End with the user's reaction. Output only the conversation."
            ),
        },
    ]


def critique_messages(task: TaskSpec, persona: dict[str, Any], reward: int, dialogue: str) -> ChatMessages:
    """Step 3 (critique and revise): check the criteria and return a corrected dialogue as JSON."""
    criteria = "\n".join(f"{i}. {c}" for i, c in enumerate(task.critique_criteria, start=1))
    return [
        {"role": "system", "content": "You are a careful editor of dialogue datasets. Reply in JSON."},
        {
            "role": "user",
            "content": (
                f"Task: {task.title}. Persona of the user: {persona_summary(persona)}\n"
                f"Required outcome — {outcome_text(task, reward)}\n"
                f"Criteria:\n{criteria}\n{len(task.critique_criteria) + 1}. The agent opens with exactly "
                f'"{task.opening_line}" and has at most {task.max_turns} turns.\n\n'
                f"Conversation:\n{dialogue}\n\n"
                "List every criterion it breaks, then rewrite the whole conversation so that it meets all of "
                "them and keeps the required outcome, with 'Agent:' and 'User:' labels, one line per turn. "
                'Reply with JSON only: {"problems": ["..."], "revised": "Agent: ...\\nUser: ..."}'
            ),
        },
    ]


def format_dialogue(turns: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """Turns as 'Agent: …' / 'User: …' lines, the format the prompts ask for."""
    return "\n".join(f"{'Agent' if role == 'agent' else 'User'}: {text}" for role, text in turns)


def agent_turn_messages(task: TaskSpec, turns: list[tuple[str, str]], instruction: str) -> ChatMessages:
    """The agent's next turn for a small model: the task's system prompt plus this turn's instruction."""
    system = f"{task.system_prompt} {instruction} Reply with one or two short sentences."
    history = [{"role": "assistant" if role == "agent" else "user", "content": text} for role, text in turns]
    return [{"role": "system", "content": system}, *history]


def user_turn_messages(
    task: TaskSpec, persona: dict[str, Any], turns: list[tuple[str, str]], instruction: str
) -> ChatMessages:
    """The user's next turn for a small model: the roles are swapped so the model speaks as the user."""
    system = (
        f"You are {task.user_role}, talking to {task.agent_role}. You are the customer, not the helper. "
        f"About you: {persona_summary(persona)} {instruction} "
        "Reply with one short sentence, as yourself, in the first person."
    )
    history = [{"role": "user" if role == "agent" else "assistant", "content": text} for role, text in turns]
    return [{"role": "system", "content": system}, *history]
