"""Reverie's imagination: task specs, LLM backends, the imagination engine and simulated users.

* :mod:`imagine.task` — :class:`~imagine.task.TaskSpec` (one TOML file per task), ``load_task``.
* :mod:`imagine.backends` — the async :class:`~imagine.backends.ChatBackend` interface, ``make_backend``
  (``openai`` for any OpenAI-compatible server, ``local`` for a transformers model on this machine).
* :mod:`imagine.engine` — :class:`~imagine.engine.ImaginationEngine`: personas → reward-conditioned
  dialogues → critique and revision → ``Conversation(source="imagined")`` rows, resumable by run id.
* :mod:`imagine.parsing` — turning free-form LLM dialogues into alternating turns (or counted rejections).
* :mod:`imagine.simulated` — scripted and LLM-driven simulated users for evaluation.

Submodules are imported on use so ``import imagine.task`` stays light.
"""
