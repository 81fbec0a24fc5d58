"""Training: BC, filtered BC, critic-awr and ILQL on one code path (:func:`train`), and nothing else imports it.

Serving (``learning.policy``, ``learning.decoding``) never imports this package; ``reverie train`` and the
improvement loop's child processes do. Each job has its file:

- ``config.py``: :class:`TrainConfig`, every field documented where it is declared;
- ``loop.py``: :func:`train`, the stages (critic → policy → value heads) and the resume logic;
- ``imitation.py``: the weighted imitation loss; ``critic.py``: the per-turn critic and its advantage weights;
- ``values.py``: the ILQL value stage on cached features; ``features.py``: the frozen-layer features;
- ``replicas.py``: data parallelism; ``resume.py``: periodic saves and the final checkpoint;
- ``data.py``: JSONL input; ``optim.py``: schedule and early stopping; ``probes.py``: the task probe;
  ``progress.py``: the clock and the progress bar.
"""

from learning.training.config import TrainConfig, TrainingError
from learning.training.data import load_dialogues_jsonl
from learning.training.loop import train

__all__ = ["TrainConfig", "TrainingError", "load_dialogues_jsonl", "train"]
