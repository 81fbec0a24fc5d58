"""The agent's notes: what the task's words read from the user so far, under every user turn a policy reads."""

from __future__ import annotations

import random

from imagine.task import TaskSpec, load_task
from imagine.world import split_items, world_for
from learning.interface import Message
from learning.notes import note, with_notes

HOUSEPLANTS = load_task("examples/houseplants.toml")


def test_a_note_lists_what_was_heard_and_what_is_still_open() -> None:
    history = [
        Message("agent", HOUSEPLANTS.opening_line),
        Message("user", "I need a plant."),
        Message("agent", "How much light does the spot get?"),
        Message("user", "A sunny windowsill, and I have a kitten."),
    ]
    annotated = with_notes(HOUSEPLANTS, history)
    assert annotated[0] == history[0] and annotated[2] == history[2]  # agent turns are untouched
    assert annotated[1].text == "I need a plant.\n(Noted: nothing yet. To ask: light, pets, watering, budget.)"
    assert annotated[3].text.endswith("(Noted: light = direct sun; pets = cats and dogs. To ask: watering, budget.)")


def test_notes_only_grow_so_a_rendered_history_is_a_prefix_of_the_next() -> None:
    history = [Message("agent", HOUSEPLANTS.opening_line), Message("user", "Under 20 euros.")]
    longer = [*history, Message("agent", "Do you have pets?"), Message("user", "No pets.")]
    assert with_notes(HOUSEPLANTS, longer)[: len(history)] == with_notes(HOUSEPLANTS, history)


def test_the_reader_knows_training_phrasings_by_heart_but_never_a_held_out_one() -> None:
    world = world_for(HOUSEPLANTS)
    light = world.attribute("light")
    # a held-out phrasing whose words the task file does not list is not read
    unlisted = [
        say
        for value in light.values
        for say in split_items(value.says, "heldout")
        if not (value.words and value.words.search(say.lower()))
    ]
    for say in unlisted:
        assert "light =" not in note(world, [Message("user", say)]), say
    for value in light.values:
        for say in split_items(value.says, "train"):
            assert f"light = {value.value}" in note(world, [Message("user", say)])


def test_a_task_with_nothing_but_value_names_still_gets_notes_from_the_names() -> None:
    task = TaskSpec(
        name="bikes",
        title="Bike shop",
        opening_line="Hi! What are you looking for?",
        critique_criteria=["The customer answers what is asked."],
        agent_role="a bike shop assistant",
        agent_goal="Recommend a bike.",
        user_role="a customer",
        success="The customer buys a fitting bike.",
        failure="The customer leaves.",
        persona_hints=["terrain (city, mountain)", "budget (cheap, premium)"],
    )
    text = with_notes(task, [Message("user", "Mostly mountain trails.")])[0].text
    assert text.endswith("(Noted: terrain = mountain. To ask: budget.)")


def test_once_nothing_is_left_to_ask_the_note_offers_the_fits_that_clash_with_nothing() -> None:
    answers = [
        "Bright, but no direct sun.",
        "My cat chews everything.",
        "I always forget to water.",
        "Around 30 euros.",
    ]
    history: list[Message] = []
    for answer in answers:
        history += [Message("agent", "Tell me more?"), Message("user", answer)]
    last = with_notes(HOUSEPLANTS, history)[-1].text
    assert "To ask: nothing. Fits them: a spider plant;" in last  # monstera (pets) and calathea, fern (watering) clash
    assert "safe for pets or pet-safe" in last and "drought-tolerant" in last
    assert "Fits them" not in with_notes(HOUSEPLANTS, history[:-2])[-1].text  # the budget is still open
    # the scripted agents' acts draw from the same options, so the imagined acts honour what the note offers
    world = world_for(HOUSEPLANTS)
    known = world.known_from_history(history)
    act = world.final_act(world.compose_act(known, random.Random(3)))
    assert act is not None and world.act_fits({**known, "mood": "browsing"}, act)


def test_an_unanswered_side_question_comes_with_the_task_files_answer_until_it_is_answered() -> None:
    history = [
        Message("agent", HOUSEPLANTS.opening_line),
        Message("user", "A sunny windowsill. By the way, does it come with a pot?"),
    ]
    assert with_notes(HOUSEPLANTS, history)[-1].text.endswith(
        "They asked: Does it come with a pot? Answer: Every plant comes in a simple nursery pot.)"
    )
    still = [
        *history,
        Message("agent", "Do you have pets?"),
        Message("user", "You didn't answer me: Does it come with a pot?"),
    ]
    assert "They asked: Does it come with a pot?" in with_notes(HOUSEPLANTS, still)[-1].text
    answered = [
        *history,
        Message("agent", "Yes, every plant comes in a simple nursery pot. Any pets?"),
        Message("user", "No pets."),
    ]
    assert "They asked" not in with_notes(HOUSEPLANTS, answered)[-1].text
