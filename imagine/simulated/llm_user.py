"""An LLM-driven simulated user: the persona sits in its hidden prompt; a judge prompt scores the episode.

Works with any backend that has an async ``complete(messages, *, max_tokens, temperature) -> str``
(:class:`ChatCompleter`; ``imagine.backends.ChatBackend`` satisfies it). The user ends an episode by
writing ``[END]``; the evaluator also ends it at the task's turn limit. :meth:`LLMUser.score` then asks
the judge (the same or another backend) whether the task succeeded, as JSON ``{"reward": 0..1, "reason": ...}``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from imagine.conversation import UserTurn
from imagine.task import TaskSpec
from storage.rewards import is_success

logger = logging.getLogger(__name__)

#: ``reward_source`` stored with episodes scored by the LLM judge.
LLM_REWARD_SOURCE = "llm_judge"
END_MARKER = "[END]"


@runtime_checkable
class ChatCompleter(Protocol):
    """The part of a chat backend an LLM user needs: messages ``[{"role", "content"}]`` in, text out."""

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.8) -> str:
        """The assistant's reply."""
        ...


def describe_persona(persona: Mapping[str, Any]) -> str:
    """A persona dict in plain words, ``key: value`` pairs."""
    return "; ".join(f"{key.replace('_', ' ')}: {value}" for key, value in persona.items())


def user_system_prompt(task: TaskSpec, persona: Mapping[str, Any]) -> str:
    """The LLM user's hidden prompt: who it is, its persona, how to behave, how to end."""
    return (
        f"You are role-playing {task.user_role}, talking to {task.agent_role}. "
        f"Your hidden persona: {describe_persona(persona)}.\n"
        "Rules: stay in character; reply in one or two short sentences; reveal a detail of your persona only "
        "when the other person asks about it; never list your preferences unprompted; never mention that you "
        "are an AI or that you have a persona.\n"
        f"When the other person has finished helping you ({task.success.rstrip('.')} or clearly failed), react "
        f"honestly to whether it fits you, and end your message with {END_MARKER}."
    )


def judge_prompt(task: TaskSpec, persona: Mapping[str, Any], transcript: list[tuple[str, str]]) -> str:
    """The judge's prompt: task, success/failure criteria, the hidden persona and the transcript."""
    lines = "\n".join(f"{'Agent' if role == 'agent' else 'User'}: {text}" for role, text in transcript)
    return (
        f"Task: {task.title}. The agent is {task.agent_role}; its goal: {task.agent_goal}\n"
        f"Success means: {task.success}\nFailure means: {task.failure}\n"
        f"The user's hidden persona (the agent could not see it): {describe_persona(persona)}\n\n"
        f"Transcript:\n{lines}\n\n"
        'Did the agent succeed for this user? Answer with JSON only: {"reward": 1 or 0, "reason": "<one sentence>"}'
    )


_REWARD_PATTERN = re.compile(r'"?reward"?\s*[:=]\s*"?([01](?:\.\d+)?)')


def parse_judgement(text: str) -> tuple[float, str]:
    """(reward in [0, 1], reason) from a judge's reply; unparseable replies score 0 with the reason saying so."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match:
        try:
            data = json.loads(match.group(0))
            reward = float(data["reward"])
            return min(1.0, max(0.0, reward)), str(data.get("reason", ""))
        except (ValueError, KeyError, TypeError):
            pass
    loose = _REWARD_PATTERN.search(text)
    if loose:
        return min(1.0, max(0.0, float(loose.group(1)))), text.strip()[:200]
    return 0.0, f"unparseable judgement: {text.strip()[:200]!r}"


class LLMUser:
    """A simulated user played by an LLM (implements ``imagine.simulated.SimulatedUser``)."""

    def __init__(
        self,
        backend: ChatCompleter,
        task: TaskSpec,
        persona: Mapping[str, Any],
        *,
        persona_type: str = "",
        judge: ChatCompleter | None = None,
        max_tokens: int = 96,
        temperature: float = 0.7,
    ) -> None:
        self.backend = backend
        self.judge = judge or backend
        self.task = task
        self.persona: dict[str, Any] = dict(persona)
        self.persona_type = persona_type or str(next(iter(self.persona.values()), "unknown"))
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.transcript: list[tuple[str, str]] = []
        self.done = False
        self.reward: float | None = None
        #: The judge's one-sentence reason, once scored.
        self.reason: str = ""
        self.outcome: str | None = None

    async def reply(self, agent_text: str) -> UserTurn:
        """The user's answer to one agent utterance; ``done`` when it wrote the end marker."""
        if self.done:
            raise RuntimeError("the episode is over")
        self.transcript.append(("agent", agent_text))
        messages = [{"role": "system", "content": user_system_prompt(self.task, self.persona)}]
        # From the user model's point of view the agent is the "user" and it is the "assistant".
        messages += [
            {"role": "user" if role == "agent" else "assistant", "content": text} for role, text in self.transcript
        ]
        text = (await self.backend.complete(messages, max_tokens=self.max_tokens, temperature=self.temperature)).strip()
        done = END_MARKER.lower() in text.lower()
        text = re.sub(re.escape(END_MARKER), "", text, flags=re.IGNORECASE).strip() or "Okay."
        self.transcript.append(("user", text))
        self.done = done
        return UserTurn(text, done=done)

    async def score(self) -> float:
        """Ask the judge once; later calls return the same reward."""
        if self.reward is None:
            prompt = judge_prompt(self.task, self.persona, self.transcript)
            answer = await self.judge.complete(
                [
                    {"role": "system", "content": "You are a strict, fair judge of goal-directed dialogues."},
                    {"role": "user", "content": prompt},
                ],
                max_tokens=96,
                temperature=0.0,
            )
            self.reward, self.reason = parse_judgement(answer)
            self.outcome = "judged_success" if is_success(self.reward) else "judged_failure"
            logger.debug("judge: reward %.2f (%s)", self.reward, self.reason)
        return self.reward


__all__ = [
    "END_MARKER",
    "LLM_REWARD_SOURCE",
    "ChatCompleter",
    "LLMUser",
    "describe_persona",
    "judge_prompt",
    "parse_judgement",
    "user_system_prompt",
]
