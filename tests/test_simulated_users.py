"""Scripted simulated users and behaviour agents: understanding, rewards, determinism, success rates."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from imagine.simulated import (
    BEHAVIOURS,
    BehaviourPolicy,
    Utterance,
    generate_scripted_dialogues,
    opening_line,
    play_scripted_episode,
    save_scripted_dialogues,
    scripted_task,
)
from imagine.simulated.teaching import EXPLANATIONS
from imagine.simulated.travel import CATALOGUE
from storage import Store

TRAVELLER = {"interest": "food", "budget": "tight", "companions": "kids"}
STUDENT = {"level": "beginner", "style": "formal", "misconception": "no_data"}


@pytest.mark.parametrize(
    ("task_name", "question", "expected"),
    [
        ("travel", "What do you enjoy doing on holiday?", ["interest"]),
        ("travel", "So what are you into these days?", ["interest"]),
        ("travel", "What sort of things do you love doing?", ["interest"]),
        ("travel", "Any hobbies?", ["interest"]),
        ("travel", "What are you interested in?", ["interest"]),
        ("travel", "How much do you want to spend?", ["budget"]),
        ("travel", "What's your price range?", ["budget"]),
        ("travel", "Is it OK if it's expensive?", ["budget"]),
        ("travel", "What budget do you have in mind?", ["budget"]),
        ("travel", "Who's coming with you?", ["companions"]),
        ("travel", "Are you travelling with anyone?", ["companions"]),
        ("travel", "Will the children join?", ["companions"]),
        ("travel", "Going on your own?", ["companions"]),
        ("travel", "What do you enjoy, and what's your budget?", ["interest", "budget"]),
        ("travel", "What kind of trip are you planning?", []),
        ("travel", "Nice weather today.", []),
        ("teaching", "How much do you know about machine learning?", ["level"]),
        ("teaching", "Tell me about your background.", ["level"]),
        ("teaching", "Are you new to machine learning?", ["level"]),
        ("teaching", "Would you prefer an example?", ["style"]),
        ("teaching", "Do you like formal definitions?", ["style"]),
        ("teaching", "How do you learn best?", ["style"]),
        ("teaching", "What do you think the difference is?", ["misconception"]),
        ("teaching", "What have you heard about RL?", ["misconception"]),
        ("teaching", "Any guess?", ["misconception"]),
        ("teaching", "Let me think.", []),
    ],
)
def test_scripted_users_understand_paraphrased_questions(task_name: str, question: str, expected: list[str]) -> None:
    assert scripted_task(task_name).asked_attributes(question) == expected


@pytest.mark.parametrize(
    ("utterance", "reward", "outcome"),
    [
        ("I recommend the market picnic.", 1.0, "fit"),
        ("You should try the Market Picnic!", 1.0, "fit"),
        ("How about a market picnic?", 1.0, "fit"),
        ("Market picnics are great for you.", 1.0, "fit"),
        ("The street food tour would be perfect for you.", 0.0, "misfit"),
        ("I'd suggest the safari park.", 0.0, "misfit"),
        ("Try the market picnic or the street food tour.", 0.0, "hedged"),
    ],
)
def test_travel_recommendation_ends_with_objective_reward(utterance: str, reward: float, outcome: str) -> None:
    user = scripted_task("travel").make_user(TRAVELLER, seed=1)
    turn = user.respond(utterance)
    assert turn.done and user.reward == reward and user.outcome == outcome
    with pytest.raises(RuntimeError):
        user.respond("Hello?")


@pytest.mark.parametrize(
    ("utterance", "reward"),
    [
        (EXPLANATIONS[("beginner", "formal")][1] + " And RL does need data.", 1.0),
        (EXPLANATIONS[("beginner", "formal")][1], 0.0),  # misconception left standing
        (EXPLANATIONS[("beginner", "formal")][1] + " And RL does need data. Also BC is not RL.", 0.0),
        (EXPLANATIONS[("beginner", "examples")][1] + " And RL does need data.", 0.0),  # wrong style
        (EXPLANATIONS[("expert", "formal")][1] + " And RL does need data.", 0.0),  # wrong level
    ],
)
def test_teaching_explanation_must_match_level_style_and_misconception(utterance: str, reward: float) -> None:
    user = scripted_task("teaching").make_user(STUDENT, seed=1)
    assert user.respond(utterance).done and user.reward == reward


def test_user_reveals_only_what_is_asked_and_is_confused_otherwise() -> None:
    task = scripted_task("travel")
    user = task.make_user(TRAVELLER, seed=3)
    intro = user.respond(opening_line("travel"))
    assert intro.text in task.intro_replies and task.read_answers(intro.text) == {}
    answer = user.respond("What's your budget?")
    assert task.read_answers(answer.text) == {"budget": "tight"}
    assert user.respond("Lovely weather, isn't it?").text in task.confused_replies
    again = user.respond("How much can you spend?")
    assert task.read_answers(again.text) == {"budget": "tight"}
    assert any(again.text.startswith(prefix) for prefix in task.repeat_prefixes)
    both = user.respond("Who is coming, and what do you enjoy?")
    assert task.read_answers(both.text) == {"companions": "kids", "interest": "food"}
    assert not user.done


@pytest.mark.parametrize(
    ("task_name", "reply", "expected"),
    [
        ("travel", "Honestly I'm a huge fan of local cuisine.", {"interest": "food"}),
        ("travel", "We'd love to see some ancient ruins.", {"interest": "history"}),
        ("travel", "I'd rather not splurge, money is tight.", {"budget": "tight"}),
        ("travel", "Luxury is fine by me.", {"budget": "generous"}),
        ("travel", "My wife and I, no children.", {}),  # both companion values mentioned: not understood
        ("travel", "My daughter is coming along.", {"companions": "kids"}),
        ("travel", "Hmm, can you ask that differently?", {}),  # the scripted user's own confused reply
        ("teaching", "I've read a bit about the basics.", {"level": "intermediate"}),
        ("teaching", "Some math would be great.", {"level": "intermediate", "style": "formal"}),
        ("teaching", "I'm not sure.", {}),  # a canned reply
        ("teaching", "Isn't RL learning without data?", {"misconception": "no_data"}),
    ],
)
def test_scripted_agents_read_free_form_answers_by_keywords(task_name: str, reply: str, expected: dict) -> None:
    assert scripted_task(task_name).read_answers(reply) == expected


def test_turn_limit_ends_episode_with_zero_reward() -> None:
    user = scripted_task("travel").make_user(TRAVELLER, seed=0, max_turns=3)
    assert not user.respond("Hi").done
    assert not user.respond("What do you enjoy?").done
    last = user.respond("Hmm.")
    assert last.done and user.reward == 0.0 and user.outcome == "turn_limit"


def test_answers_are_specific_to_their_value() -> None:
    """Reading an answer back must give exactly its own value (scripted agents rely on it)."""
    for task_name in ("travel", "teaching"):
        task = scripted_task(task_name)
        for attribute in task.attributes:
            for value, answers in attribute.answers.items():
                for answer in answers:
                    assert task.read_answers(answer) == {attribute.name: value}, answer


def test_every_travel_persona_has_exactly_one_fitting_activity() -> None:
    task = scripted_task("travel")
    personas = [
        dict(zip(task.attribute_names, values, strict=True))
        for values in itertools.product(*(a.values for a in task.attributes))
    ]
    assert len(personas) == len(CATALOGUE) == 16
    for persona in personas:
        fitting = [a for a in CATALOGUE if task.act_fits(persona, task.final_act(f"I recommend {a.name}."))]
        assert len(fitting) == 1


def test_persona_sampling_is_seeded_and_covers_the_space() -> None:
    task = scripted_task("travel")
    first, again, other = (
        task.sample_personas(200, seed=0),
        task.sample_personas(200, seed=0),
        task.sample_personas(200, seed=1),
    )
    assert first == again and first != other
    assert len({tuple(p.values()) for p in first}) == 16
    with pytest.raises(ValueError, match="budget"):
        task.make_user({"interest": "food", "budget": "huge", "companions": "kids"})


def test_generation_is_deterministic_and_well_formed() -> None:
    first = generate_scripted_dialogues("travel", 50, seed=7)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in generate_scripted_dialogues("travel", 50, seed=7)]
    assert [r.turns for r in first] != [r.turns for r in generate_scripted_dialogues("travel", 50, seed=8)]
    for record in first:
        assert record.source == "imagined" and record.meta["generator"] == "scripted"
        assert record.meta["behaviour"] in BEHAVIOURS and record.reward in (0.0, 1.0)
        assert record.turns[0].role == "agent" and record.turns[0].text == opening_line("travel")
        assert [t.role for t in record.turns] == ["agent", "user"] * (len(record.turns) // 2)
    with pytest.raises(ValueError, match="unknown behaviours"):
        generate_scripted_dialogues("travel", 1, seed=0, mix={"genius": 1.0})


@pytest.mark.parametrize("task_name", ["travel", "teaching"])
def test_behaviour_mix_is_suboptimal_and_optimum_is_rare(task_name: str) -> None:
    records = generate_scripted_dialogues(task_name, 500, seed=0)
    success = sum(r.reward for r in records) / len(records)
    assert 0.30 <= success <= 0.50
    by_behaviour = Counter(r.meta["behaviour"] for r in records)
    assert 0 < by_behaviour["careful"] < 0.2 * len(records)
    careful = [r.reward for r in records if r.meta["behaviour"] == "careful"]
    eager = [r.reward for r in records if r.meta["behaviour"] == "eager"]
    assert sum(careful) == len(careful)  # asking everything is optimal
    assert sum(eager) / len(eager) < 0.3


def test_behaviour_policy_plays_like_the_generator_and_fits_the_policy_protocol() -> None:
    from learning.interface import Message, Policy

    policy = BehaviourPolicy("travel", "careful")
    assert isinstance(policy, Policy) and policy.name == "scripted:careful" and policy.version_id is None
    task = scripted_task("travel")
    user = task.make_user(TRAVELLER, seed=5)
    history: list[Message] = []
    while not user.done:
        (reply,) = policy.respond_batch([history], seed=0)
        history += [Message("agent", reply), Message("user", user.respond(reply).text)]
    assert user.reward == 1.0 and len(history) == 10  # opening, three questions, the recommendation
    assert policy.respond_batch([history[:4]], seed=3) == policy.respond_batch([history[:4]], seed=3)
    policy.close()
    with pytest.raises(RuntimeError):
        policy.respond_batch([[]])
    with pytest.raises(ValueError, match="unknown behaviour"):
        BehaviourPolicy("travel", "genius")


def test_play_scripted_episode_accepts_any_persona() -> None:
    turns, reward, outcome = play_scripted_episode("teaching", "careful", STUDENT, seed=0)
    assert reward == 1.0 and outcome == "fit" and isinstance(turns[0], Utterance)


async def test_scripted_dialogues_are_stored_with_persona_and_reward(store: Store) -> None:
    records = generate_scripted_dialogues("teaching", 5, seed=2)
    ids = await save_scripted_dialogues(store, records)
    assert len(ids) == 5
    assert await store.count_conversations(source="imagined", task="teaching", with_reward=True) == 5
    stored = await store.get_conversation(ids[0])
    assert stored is not None and stored.persona == records[0].persona and stored.meta["generator"] == "scripted"
    turns = await store.get_turns(ids[0])
    assert [(t.role, t.text) for t in turns] == [(t.role, t.text) for t in records[0].turns]
