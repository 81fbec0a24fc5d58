"""The compiled world of a task (``imagine.world``): built from any TOML, it simulates users, scripts agents and
judges final acts. The built-in tasks and the example are instances of it, tested here like a user's own task."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from imagine.conversation import Utterance
from imagine.simulated import (
    BEHAVIOURS,
    BehaviourPolicy,
    generate_scripted_dialogues,
    play_scripted_episode,
    save_scripted_dialogues,
)
from imagine.task import load_task
from imagine.world import ANY, TaskWorldError, split_items, world_for
from storage import Store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "houseplants.toml"
TASKS = ["travel", "teaching", str(EXAMPLE)]

TRAVELLER = {
    "main interest": "nightlife",
    "budget": "tight",
    "travel companions": "family with kids",
    "pace": "slow and relaxed",
    "how much they volunteer unprompted": "reserved",
}

#: A task of one's own with nothing but value names (no [[task.attributes]], no templates).
NAMES_ONLY = """
[task]
name = "bikes"
title = "Bike shop"
agent_role = "a bike shop assistant"
agent_goal = "Find out how the customer rides, then recommend one bike."
user_role = "a customer who wants a bike"
success = "The bike fits how they ride."
failure = "It does not."
persona_hints = [
  "terrain (city streets, mountain trails, gravel roads)",
  "frame size (small, medium, large)",
  "budget (low, high)",
]
critique_criteria = ["The customer answers when asked."]
opening_line = "Hi! Looking for a bike?"
max_turns = 7
"""


def names_only(tmp_path: Path) -> Path:
    path = tmp_path / "bikes.toml"
    path.write_text(NAMES_ONLY, encoding="utf-8")
    return path


@pytest.mark.parametrize("task", TASKS)
def test_every_shipped_task_compiles_over_every_value_its_hints_name(task: str) -> None:
    from imagine.personas import dimensions

    world = world_for(task)
    hinted = {d.name: set(d.values) for d in dimensions(world.spec)}
    assert {a.name: set(a.value_names) for a in world.attributes} == hinted
    personas = world.sample_personas(2000, seed=0)
    for attribute in world.attributes:
        assert {p[attribute.name] for p in personas} - {ANY} == hinted[attribute.name]
    assert world.persona_space == len({world.combination(p) for p in personas if ANY not in world.combination(p)})


def test_travel_covers_what_the_scripted_catalogue_did_not() -> None:
    world = world_for("travel")
    assert world.persona_space == 7 * 3 * 4 * 2 and world.attribute_names == (
        "main interest",
        "budget",
        "travel companions",
        "pace",
    )
    rng = random.Random(0)
    for interest in ("nightlife", "relaxation", "adventure"):
        persona = {**TRAVELLER, "main interest": interest}
        act = world.best_act(persona, rng)
        assert world.act_fits(persona, world.final_act(act)), act


@pytest.mark.parametrize(
    ("act", "outcome"),
    [
        ("How about a night market stroll? It's budget-friendly, kid-friendly and unhurried.", []),
        ("How about a jazz bar evening? It's budget-friendly, kid-friendly and unhurried.", ["clashes"]),
        ("How about a night market stroll? It's a luxury option, kid-friendly and unhurried.", ["budget"]),
        ("How about a night market stroll? It's budget-friendly and kid-friendly.", ["nothing for slow"]),
        ("How about a night market stroll or a spa day? It's budget-friendly, kid-friendly and unhurried.", ["hedged"]),
        ("I recommend the wine tasting dinner.", ["nothing for nightlife"]),
    ],
)
def test_the_judge_checks_every_value_and_every_clash(act: str, outcome: list[str]) -> None:
    world = world_for("travel")
    found = world.final_act(act)
    assert found is not None
    problems = world.act_problems(TRAVELLER, found)
    assert all(any(word in p for p in problems) for word in outcome) and bool(problems) == bool(outcome), problems


def test_a_question_is_never_an_act_and_no_preference_is_honoured_by_any_value() -> None:
    world = world_for("travel")
    assert world.final_act("How about a spa day? What's your budget?") is None
    assert world.asked_attributes("Great. What's your budget? And who's coming along?") == [
        "budget",
        "travel companions",
    ]
    flexible = {**TRAVELLER, "budget": ANY}
    for budget in ("budget-friendly", "reasonably priced", "premium"):
        act = world.final_act(f"How about a night market stroll? It's {budget}, kid-friendly and unhurried.")
        assert act is not None and world.act_fits(flexible, act)


def test_teaching_corrects_exactly_the_students_misconception() -> None:
    world = world_for("teaching")
    student = {
        "knowledge level": "expert",
        "preferred style": "formal definitions",
        "misconception": "none",
        "patience": "short attention",
    }
    good = (
        "Technically: cloning copies an expert, RL learns from rewards. "
        "Formally, a supervised loss versus expected return."
    )
    assert world.act_fits(student, world.final_act(good))
    wrong = good + " RL does need data."
    assert not world.act_fits(student, world.final_act(wrong))
    assert world.act_fits({**student, "misconception": "RL needs no data"}, world.final_act(wrong))


@pytest.mark.parametrize("task", TASKS)
def test_held_out_phrasings_and_combinations_are_never_trained_on(task: str) -> None:
    world = world_for(task)
    held = world.heldout_combinations()
    assert held and 0.1 <= len(held) / world.persona_space <= 0.3
    train = world.sample_personas(500, seed=1, split="train")
    assert all(world.combination_split(p) == "train" for p in train)
    assert not {world.combination(p) for p in train} & held
    heldout = world.sample_personas(100, seed=1, split="heldout")
    assert all(world.combination_split(p) == "heldout" for p in heldout)
    for attribute in world.preferences:
        for value in attribute.values:
            seen, unseen = split_items(value.says, "train"), split_items(value.says, "heldout")
            assert unseen and not set(seen) & set(unseen)
    # scripted imagination speaks training phrasings only
    spoken = {t.text for r in generate_scripted_dialogues(task, 300, seed=4) for t in r.turns if t.role == "user"}
    never = {s for a in world.preferences for v in a.values for s in split_items(v.says, "heldout")}
    assert not any(phrase in text for text in spoken for phrase in never if len(phrase) > 12)


def test_users_volunteer_answer_vaguely_and_insist_on_side_questions() -> None:
    world = world_for("travel")
    volunteered = vague = insisted = 0
    for seed in range(200):
        user = world.make_user({**TRAVELLER, "how much they volunteer unprompted": "chatty"}, seed=seed)
        first = user.respond(world.spec.opening_line).text
        volunteered += bool(world.read_answers(first))
        answer = user.respond("What's your budget?").text
        vague += "budget" in answer and "tight" not in answer.lower() and not world.read_answers(answer).get("budget")
        if "By the way" in answer:
            insisted += (
                "didn't answer" in user.respond("What pace suits you?").text
                or "Wait" in user.respond("Who's coming along?").text
            )
    assert 40 <= volunteered <= 160 and 5 <= vague <= 60 and insisted > 0


def test_re_asking_a_given_value_is_recorded() -> None:
    world = world_for("travel")
    user = world.make_user({**TRAVELLER}, seed=3, max_turns=8)
    user._vague.clear()  # this user answers at once
    user.respond(world.spec.opening_line)
    user.respond("What's your budget?")
    assert not user.re_asked
    again = user.respond("How much do you want to spend?").text
    assert again.startswith(("As I said", "Like I mentioned", "Again")) and user.re_asked


def test_a_task_with_value_names_only_still_works(tmp_path: Path) -> None:
    world = world_for(names_only(tmp_path))
    assert world.persona_space == 18 and world.attribute_names == ("terrain", "frame size", "budget")
    personas = world.sample_personas(60, seed=0, split="heldout")
    for behaviour, expected in (("careful", 1.0), ("eager", 0.4)):
        rewards = [play_scripted_episode(world.spec, behaviour, p, seed=i)[1] for i, p in enumerate(personas)]
        assert (sum(rewards) / len(rewards) == 1.0) if expected == 1.0 else (sum(rewards) / len(rewards) < expected)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('"budget (low, high)"', '"budget"'), "'budget' lists no values"),
        (
            lambda t: t + 'act_templates = ["I pick {main} in {colour}."]\n',
            "{colour} is not main, rest or a preference",
        ),
        (
            lambda t: t + '[[task.attributes]]\ndimension = "budget"\nquestions = ["Where do you ride?"]\n',
            "question 'Where do you ride?' for 'budget'",
        ),
    ],
)
def test_a_world_that_would_misread_itself_is_refused_with_the_lines_to_fix(
    tmp_path: Path, edit: object, message: str
) -> None:
    path = tmp_path / "bikes.toml"
    path.write_text(edit(NAMES_ONLY), encoding="utf-8")  # type: ignore[operator]
    with pytest.raises(TaskWorldError, match=__import__("re").escape(message)):
        world_for(load_task(path))


def test_generation_is_deterministic_and_well_formed() -> None:
    first = generate_scripted_dialogues("travel", 50, seed=7)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in generate_scripted_dialogues("travel", 50, seed=7)]
    assert [r.turns for r in first] != [r.turns for r in generate_scripted_dialogues("travel", 50, seed=8)]
    for record in first:
        assert record.source == "imagined" and record.meta["generator"] == "scripted"
        assert record.meta["behaviour"] in BEHAVIOURS and record.reward in (0.0, 1.0)
        assert record.turns[0].role == "agent" and record.turns[0].text == load_task("travel").opening_line
        assert [t.role for t in record.turns] == ["agent", "user"] * (len(record.turns) // 2)
    with pytest.raises(ValueError, match="unknown behaviours"):
        generate_scripted_dialogues("travel", 1, seed=0, mix={"genius": 1.0})


@pytest.mark.parametrize("task", TASKS)
def test_behaviour_mix_is_suboptimal_and_optimum_is_rare(task: str) -> None:
    records = generate_scripted_dialogues(task, 500, seed=0)
    success = sum(r.reward for r in records) / len(records)
    assert 0.15 <= success <= 0.50
    by_behaviour = Counter(r.meta["behaviour"] for r in records)
    assert 0 < by_behaviour["careful"] < 0.2 * len(records)
    careful = [r.reward for r in records if r.meta["behaviour"] == "careful"]
    eager = [r.reward for r in records if r.meta["behaviour"] == "eager"]
    assert sum(careful) == len(careful)  # listening, answering side questions and asking the rest is optimal
    assert sum(eager) / len(eager) < 0.3
    # the careful agent never re-asks; the others sometimes do, so the data shows both
    world = world_for(task)
    careful_re_asks = [r for r in records if r.meta["behaviour"] == "careful" and _re_asked(world, r)]
    assert not careful_re_asks and any(_re_asked(world, r) for r in records)


def _re_asked(world: object, record: object) -> bool:
    known: set[str] = set()
    for turn in record.turns:  # type: ignore[attr-defined]
        if turn.role == "user":
            known |= set(world.read_answers(turn.text))  # type: ignore[attr-defined]
        elif known & set(world.asked_attributes(turn.text)):  # type: ignore[attr-defined]
            return True
    return False


def test_behaviour_policy_plays_like_the_generator_and_fits_the_policy_protocol() -> None:
    from learning.interface import Message, Policy

    policy = BehaviourPolicy("travel", "careful")
    assert isinstance(policy, Policy) and policy.name == "scripted:careful" and policy.version_id is None
    user = world_for("travel").make_user(TRAVELLER, seed=5)
    history: list[Message] = []
    while not user.done:
        (reply,) = policy.respond_batch([history], seed=0)
        history += [Message("agent", reply), Message("user", user.respond(reply).text)]
    assert user.reward == 1.0 and not user.re_asked
    assert policy.respond_batch([history[:4]], seed=3) == policy.respond_batch([history[:4]], seed=3)
    policy.close()
    with pytest.raises(RuntimeError):
        policy.respond_batch([[]])
    with pytest.raises(ValueError, match="unknown behaviour"):
        BehaviourPolicy("travel", "genius")


def test_play_scripted_episode_accepts_any_persona() -> None:
    student = {
        "knowledge level": "some machine learning",
        "preferred style": "code",
        "misconception": "rewards are labels",
        "patience": "short attention",
    }
    turns, reward, outcome = play_scripted_episode("teaching", "careful", student, seed=0)
    assert reward == 1.0 and outcome == "fit" and isinstance(turns[0], Utterance)
    with pytest.raises(ValueError, match="budget"):
        world_for("travel").make_user({**TRAVELLER, "budget": "huge"})


async def test_scripted_dialogues_are_stored_with_persona_and_reward(store: Store) -> None:
    records = generate_scripted_dialogues("teaching", 5, seed=2)
    ids = await save_scripted_dialogues(store, records)
    assert len(ids) == 5
    assert await store.count_conversations(source="imagined", task="teaching", with_reward=True) == 5
    stored = await store.get_conversation(ids[0])
    assert stored is not None and stored.persona == records[0].persona and stored.meta["generator"] == "scripted"
    turns = await store.get_turns(ids[0])
    assert [(t.role, t.text) for t in turns] == [(t.role, t.text) for t in records[0].turns]
