"""Which source imagines an improvement run's dialogues, and why: one decision, :func:`choose_imagination`.

``IMAGINE_BACKEND=auto`` (the default) picks, per task:

1. for any task whose world compiles from its TOML (:func:`imagine.world.world_for`; every task whose persona
   hints list values), the scripted source: scripted behaviour agents talking to the world's simulated users,
   thousands of useful dialogues a minute and no model; when an OpenAI-compatible server is configured
   (``OPENAI_BASE_URL`` or ``OPENAI_API_KEY``) its free-form dialogues are mixed in (``also``);
2. otherwise the server when one is configured;
3. otherwise the base model on this machine, with a warning when it is the bundled 135 M model, whose dialogues
   are weak.

An explicit ``IMAGINE_BACKEND`` (``openai``, ``local``, ``scripted``) is obeyed as it is, with the same warnings.
The improvement loop logs the choice at the start of every run, records it in the run's config and shows it in
``/status``; ``reverie imagine`` resolves ``auto`` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bot.settings import Settings
    from imagine.task import TaskSpec

#: A concrete imagination source (``auto`` resolved).
ImagineBackend = Literal["openai", "local", "scripted"]

#: Fresh dialogues per improvement run when ``IMPROVE_IMAGINED`` is unset, by source: the scripted simulators write
#: thousands a minute and imitation needs thousands (travel: 3600 dialogues → critic-awr 94.5 %, BENCHMARKS.md);
#: an LLM writes one every few seconds (a server) to a minute (the bundled model on 2 cores).
IMAGINED_PER_RUN: dict[str, int] = {"scripted": 2400, "openai": 60, "local": 60}

#: The configured name of the bundled base model (``learning.base_model.BUNDLED_NAME``, not imported: torch).
_BUNDLED = "smollm2"


@dataclass(frozen=True)
class ImaginationChoice:
    """The imagination source of a run, why it was chosen, and a warning about its quality if there is one."""

    backend: ImagineBackend
    reason: str
    warning: str | None = None
    #: A second source whose dialogues are mixed in (the LLM server beside the compiled world), if any.
    also: ImagineBackend | None = None

    def describe(self) -> str:
        """One line for logs and ``/status``."""
        line = f"{self.backend}{f' + {self.also}' if self.also else ''} ({self.reason})"
        return f"{line}. Warning: {self.warning}" if self.warning else line


def world_problem(task: TaskSpec) -> str | None:
    """Why the task's world does not compile (``None``: it does, so it has simulated users and scripted agents)."""
    from imagine.world import TaskWorldError, world_for

    try:
        world_for(task)
    except TaskWorldError as error:
        return str(error)
    return None


def world_available(task: TaskSpec) -> bool:
    """Whether the task's world compiles (see :func:`world_problem`)."""
    return world_problem(task) is None


def llm_server_configured(settings: Settings) -> bool:
    """Whether an OpenAI-compatible server is configured (a base URL, or an API key for api.openai.com)."""
    return settings.openai_base_url is not None or settings.openai_api_key is not None


def _local_warning(settings: Settings) -> str | None:
    if settings.base_model != _BUNDLED:
        return None
    return (
        "the bundled SmolLM2-135M writes weak dialogues (about 1-2 a minute on 2 CPU cores, often out of role), "
        "so a policy trained on them may not improve; set OPENAI_BASE_URL to an OpenAI-compatible server "
        "(vLLM, Ollama, llama.cpp) for useful imagined data"
    )


def choose_imagination(settings: Settings, task: TaskSpec) -> ImaginationChoice:
    """The imagination source for ``task`` under ``settings``; see the module docstring for the rule."""
    problem = world_problem(task)
    configured = settings.imagine_backend
    if configured == "openai":
        return ImaginationChoice("openai", "IMAGINE_BACKEND=openai")
    if configured == "local":
        return ImaginationChoice("local", "IMAGINE_BACKEND=local", _local_warning(settings))
    if configured == "scripted":
        warning = None if problem is None else f"imagination will fail: {problem}"
        return ImaginationChoice("scripted", "IMAGINE_BACKEND=scripted", warning)
    server = llm_server_configured(settings)
    if problem is None:
        reason = f"IMAGINE_BACKEND=auto: task {task.name!r} compiles into a world of simulated users"
        if server:
            return ImaginationChoice("scripted", reason + ", an LLM server's dialogues mixed in", also="openai")
        return ImaginationChoice("scripted", reason)
    if server:
        return ImaginationChoice("openai", f"IMAGINE_BACKEND=auto, an LLM server is configured ({problem})")
    return ImaginationChoice(
        "local",
        f"IMAGINE_BACKEND=auto, no LLM server configured and no world ({problem}): the base model "
        f"{settings.base_model!r} on this machine",
        _local_warning(settings),
    )


def imagined_per_run(settings: Settings, choice: ImaginationChoice) -> int:
    """Fresh imagined dialogues per improvement run: ``IMPROVE_IMAGINED`` when set, else the source's default
    (:data:`IMAGINED_PER_RUN`)."""
    if settings.improve_imagined is not None:
        return settings.improve_imagined
    return IMAGINED_PER_RUN[choice.backend]


def chat_backend(settings: Settings) -> Literal["openai", "local"]:
    """The LLM backend for what needs a chat model rather than scripted dialogues (LLM-driven simulated users and
    their judge): ``IMAGINE_BACKEND`` when it names one, else the configured server, else the local model."""
    backend = settings.imagine_backend
    if backend == "openai" or backend == "local":
        return backend
    return "openai" if llm_server_configured(settings) else "local"
