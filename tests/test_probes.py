"""The task probes that end imitation: both kinds are taken from held-out states, and each judges what it should."""

from __future__ import annotations

import random
from pathlib import Path

from imagine.simulated.behaviour import generate_scripted_dialogues
from imagine.task import load_task
from imagine.world import world_for
from learning.base_model import tiny_tokenizer
from learning.dataset import encode_records, record_messages
from learning.training.probes import ProbeFit, TaskProbe, reply_fits, task_probes

HOUSEPLANTS = Path(__file__).resolve().parents[1] / "examples" / "houseplants.toml"


def test_probes_of_both_kinds_come_from_a_task_file_with_what_was_known_there() -> None:
    spec = load_task(HOUSEPLANTS)
    world = world_for(spec)
    records = generate_scripted_dialogues(HOUSEPLANTS, 60, seed=5)
    items, _ = encode_records(records, tiny_tokenizer(), spec)
    probes = task_probes(spec, records, items, limit=5)
    kinds = [probe.kind for probe in probes]
    assert kinds.count("act") == 5 and kinds.count("question") == 5
    for probe in probes:
        assert probe.known and set(probe.known) <= set(world.attribute_names)
        assert (len(probe.known) == len(world.attribute_names)) == (probe.kind == "act")
    # a question probe's known set is what its history revealed: re-derive one from its dialogue
    question = next(p for p in probes if p.kind == "question")
    origin = next(i for i in items if i.input_ids[: len(question.prompt)] == question.prompt)
    messages = record_messages(records[origin.origin])
    assert any(frozenset(world.known_from_history(messages[:index])) == question.known for index in origin.turn_message)


def test_a_question_probe_wants_an_open_value_asked_and_nothing_given_asked_again() -> None:
    world = world_for(load_task(HOUSEPLANTS))
    persona = {"light": "direct sun", "pets": "no pets", "watering": "forgetful", "budget": "under 20 euros"}
    probe = TaskProbe([1], "question", persona, frozenset({"light"}))
    rng = random.Random(0)
    assert reply_fits(world, probe, world.ask("pets", rng))
    assert not reply_fits(world, probe, world.ask("light", rng))  # a re-ask
    assert not reply_fits(world, probe, "Sounds exciting!")  # asks nothing
    assert not reply_fits(world, probe, world.best_act(persona, rng))  # acts before knowing enough
    act_probe = TaskProbe([1], "act", persona, frozenset(persona))
    assert reply_fits(world, act_probe, world.best_act(persona, rng))
    assert not reply_fits(world, act_probe, world.ask("pets", rng))


def test_the_fit_target_needs_every_probed_kind() -> None:
    assert ProbeFit(0.95, 0.92).meets(0.9)
    assert not ProbeFit(1.0, 0.5).meets(0.9)
    assert ProbeFit(0.95, None).meets(0.9)
    assert not ProbeFit(None, None).meets(0.0)
    assert ProbeFit(0.5, None).as_metrics() == {"fit_at_full_knowledge": 0.5}
