"""The training config documents every field where it is declared, and ``reverie train`` offers only its fields."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import typer

from bot.cli import app
from learning.dataset import EncodedDialogue
from learning.ilql import ILQLConfig
from learning.training import TrainConfig
from learning.training.critic import AdvantageWeights, CriticConfig, imitation_floors
from storage.rewards import SUCCESS_THRESHOLD

#: ``reverie train`` options that are not config fields: where data comes from and goes, and how the run looks.
NOT_CONFIG = {"dialogues", "out", "init_from", "quiet", "register", "job"}
#: CLI names of config fields that differ from the field's name.
CLI_NAME = {"algo": "algorithm"}


def _documented_fields(cls: type) -> dict[str, str]:
    """Field name → its ``#:`` comment (the lines right above the declaration)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    [node] = ast.parse(source).body
    docs: dict[str, str] = {}
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            above = []
            row = statement.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                above.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            docs[statement.target.id] = " ".join(above)
    return docs


def test_every_config_field_is_documented_where_it_is_declared() -> None:
    for cls in (TrainConfig, ILQLConfig, CriticConfig):
        docs = _documented_fields(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(docs) == fields, cls
        undocumented = [name for name, doc in docs.items() if not doc]
        assert not undocumented, f"{cls.__name__}: fields without a '#:' comment: {undocumented}"


def test_reverie_train_options_are_config_fields() -> None:
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {parameter.name for parameter in command.params}
    config_options = {CLI_NAME.get(name, name) for name in options - NOT_CONFIG}
    assert config_options <= fields, f"options that are no TrainConfig field: {config_options - fields}"
    assert {"algorithm", "steps", "real_ratio", "batch_size", "seed"} <= config_options


def _dialogue(reward: float) -> EncodedDialogue:
    """An encoded dialogue that only carries its terminal reward (all ``imitation_floors`` reads)."""
    return EncodedDialogue([], [], [], [], [], [0], [1], [reward], [True], reward, "imagined")


def test_only_the_reference_dialogues_keep_the_imitation_floor() -> None:
    """With filtered BC as the reference, a failed dialogue's turn the critic rates below average all but vanishes
    from the actor's loss (the old floor on every dialogue kept it at weight ≥ 1), while a successful dialogue's
    turn is still imitated however the critic rates it; with BC as the reference every turn keeps the floor."""
    items = [_dialogue(1.0), _dialogue(0.0)]
    advantages = [[-0.5], [-0.5]]
    config = CriticConfig()
    assert config.reference == "fbc"
    floors = imitation_floors(config, items, SUCCESS_THRESHOLD)
    weights = AdvantageWeights.from_advantages(advantages, 0.1, 20.0, floors).weights
    assert weights[0][0] > 1.0 and weights[1][0] < 0.01
    config.reference = "bc"
    floors = imitation_floors(config, items, SUCCESS_THRESHOLD)
    weights = AdvantageWeights.from_advantages(advantages, 0.1, 20.0, floors).weights
    assert weights[0][0] == weights[1][0] > 1.0
