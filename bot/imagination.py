"""Which source imagines an improvement run's dialogues, and why: one decision, :func:`choose_imagination`.

``IMAGINE_BACKEND=auto`` (the default) picks, per task:

1. an OpenAI-compatible server when one is configured (``OPENAI_BASE_URL`` or ``OPENAI_API_KEY``);
2. otherwise, for a built-in task with scripted simulators (``imagine.simulated.scripted_tasks``), the scripted
   source: scripted behaviour agents talking to scripted users, useful dialogues in seconds and no model;
3. otherwise (a custom task) the base model on this machine, with a warning when it is the bundled 135 M model,
   whose dialogues are weak.

An explicit ``IMAGINE_BACKEND`` (``openai``, ``local``, ``scripted``) is obeyed as it is, with the same warnings.
The improvement loop logs the choice at the start of every run, records it in the run's config and shows it in
``/status``; ``reverie imagine`` resolves ``auto`` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bot.settings import Settings

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

    def describe(self) -> str:
        """One line for logs and ``/status``."""
        line = f"{self.backend} ({self.reason})"
        return f"{line}. Warning: {self.warning}" if self.warning else line


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


def choose_imagination(settings: Settings, task: str) -> ImaginationChoice:
    """The imagination source for ``task`` (its name) under ``settings``; see the module docstring for the rule."""
    from imagine.simulated import scripted_tasks

    scripted = task in scripted_tasks()
    configured = settings.imagine_backend
    if configured == "openai":
        return ImaginationChoice("openai", "IMAGINE_BACKEND=openai")
    if configured == "local":
        return ImaginationChoice("local", "IMAGINE_BACKEND=local", _local_warning(settings))
    if configured == "scripted":
        if scripted:
            return ImaginationChoice("scripted", "IMAGINE_BACKEND=scripted")
        warning = (
            f"task {task!r} has no scripted simulators (only {', '.join(scripted_tasks())} do): imagination will "
            "fail; set IMAGINE_BACKEND=auto"
        )
        return ImaginationChoice("scripted", "IMAGINE_BACKEND=scripted", warning)
    if llm_server_configured(settings):
        return ImaginationChoice("openai", "IMAGINE_BACKEND=auto and an LLM server is configured")
    if scripted:
        reason = f"IMAGINE_BACKEND=auto, no LLM server configured, built-in task {task!r} has scripted simulators"
        return ImaginationChoice("scripted", reason)
    return ImaginationChoice(
        "local",
        f"IMAGINE_BACKEND=auto, no LLM server configured, custom task {task!r}: the base model {settings.base_model!r} "
        "on this machine",
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
