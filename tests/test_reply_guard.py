"""The reply guard: degenerate text never reaches a user, a good reply always does, and a question the user already
answered is replaced by one about what is still unknown (``bot.reply_guard``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bot.events import ChatRef
from bot.policy_holder import PolicyHolder
from bot.reply_guard import GENERIC_CLARIFICATION, ReplyGuard, degenerate
from bot.service import DialogueService
from bot.settings import Settings
from imagine.conversation import Utterance
from imagine.task import load_task
from imagine.world import world_for
from learning.interface import Policy
from storage import Store
from tests.test_service import ScriptedPolicy
from tests.test_telegram import tiny_policy  # noqa: F401 - the babbling policy, a shared fixture

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["travel", "teaching", str(ROOT / "examples" / "houseplants.toml")]
#: Out-of-distribution messages the suite keeps: long words, other scripts, code, emoji floods, injections, noise.
OOD_MESSAGES: list[str] = json.loads((ROOT / "tests" / "data" / "ood_messages.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The_N. The originalx is the_NNDoC. The original_N are the_N of the_NN.", "not words"),
        ("", "empty"),
        ("   \n ", "empty"),
        ("a" * 60, "overlong word"),
        ("user: I want a spa day", "role marker"),
        ("Sure!<|im_end|><|im_start|>user", "role marker"),
        ("the trip the trip the trip the trip the trip", "repeats itself"),
        ("no no no, I mean it", "repeats itself"),
        ("🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉", "not words"),
        ("{}{}{}[]][ ;;;; ::: ///", "not words"),
        ("xqzt_vb wqq__ 0x0x0x lkj_lkj", "not words"),
    ],
)
def test_degenerate_text_is_named(text: str, reason: str) -> None:
    assert degenerate(text) == reason


@pytest.mark.parametrize("task", TASKS)
def test_every_line_a_good_agent_says_passes(task: str) -> None:
    world = world_for(task)
    rng = random.Random(0)
    lines = [world.spec.opening_line, *(q for a in world.preferences for q in a.questions)]
    lines += [
        f"Good question! {side.answer} {world.ask(world.attribute_names[0], rng)}" for side in world.side_questions
    ]
    lines += [world.best_act(persona, rng) for persona in world.sample_personas(200, seed=0)]
    lines += ["Je vous recommande une visite du vieux château.", "Hi 👋 How can I help?", "It costs about 35 euros."]
    assert [line for line in lines if degenerate(line)] == []


def test_a_question_already_answered_is_replaced_by_one_still_open() -> None:
    guard = ReplyGuard(load_task("travel"))
    history = [
        Utterance("agent", "Hi! What kind of trip are you planning?"),
        Utterance("user", "Somewhere with my kids, we love nature. We're on a shoestring."),
    ]
    review = guard.review(history, "How much do you want to spend?")
    assert review.replaced is not None and "budget" in review.replaced
    assert guard.world is not None and guard.world.asked_attributes(review.text) == ["pace"]
    assert guard.review(history, "What pace suits you?").replaced is None  # a new question goes through
    act = "How about a forest trail? It's low-cost, kid-friendly and unhurried."
    assert guard.review(history, act).replaced is None


def test_a_question_asked_when_everything_is_known_is_replaced_by_a_fitting_recommendation() -> None:
    task = load_task(str(ROOT / "examples" / "houseplants.toml"))
    guard = ReplyGuard(task)
    history = [
        Utterance("agent", task.opening_line),
        Utterance("user", "A sunny windowsill. I have a cat."),
        Utterance("agent", "How often do you remember to water?"),
        Utterance("user", "I always forget to water. Under 20 euros."),
    ]
    review = guard.review(history, "Do you have any pets?")
    assert review.replaced is not None and "pets" in review.replaced
    world = guard.world
    assert world is not None
    act = world.final_act(review.text)
    persona = {"light": "direct sun", "pets": "cats and dogs", "watering": "forgetful", "budget": "under 20 euros"}
    assert act is not None and world.act_fits({**persona, "mood": "browsing"}, act), review.text


def test_a_side_question_left_unanswered_gets_the_task_files_answer_then_the_conversation_moves_on() -> None:
    """Every houseplants failure read behind the guard was "does it come with a pot?" answered with the policy's
    own guess ("Yes, it does.") or not at all: the task file's answer goes first, then a question still open."""
    task = load_task(str(ROOT / "examples" / "houseplants.toml"))
    guard = ReplyGuard(task)
    world = guard.world
    assert world is not None
    history = [
        Utterance("agent", task.opening_line),
        Utterance("user", "A sunny windowsill. By the way, does it come with a pot?"),
    ]
    pot = next(side for side in world.side_questions if "pot" in side.question)
    review = guard.review(history, "Good question! Yes, it does.")
    assert review.replaced is not None and "unanswered" in review.replaced
    assert review.text.startswith(f"Good question! {pot.answer} ") and "Yes, it does" not in review.text
    assert world.asked_attributes(review.text) and not set(world.asked_attributes(review.text)) & {"light"}
    # a reply that asks something open keeps that question, in the world's words, after the answer
    asks_pets = guard.review(history, "Good question! Yes. Do you have any pets?")
    assert asks_pets.text.startswith(f"Good question! {pot.answer} ") and world.asked_attributes(asks_pets.text) == [
        "pets"
    ]
    # answered, or asked no more once answered: nothing replaced
    answered = f"Good question! {pot.answer} Do you have any pets?"
    assert guard.review(history, answered).replaced is None
    later = [*history, Utterance("agent", answered), Utterance("user", "No pets.")]
    assert guard.review(later, "How often do you remember to water?").replaced is None


def test_a_task_without_a_world_still_gets_a_safe_clarification(tmp_path: Path) -> None:
    spec = load_task("travel").model_copy(update={"persona_hints": ["taste"], "attributes": []})
    guard = ReplyGuard(spec)
    assert guard.world is None
    assert guard.review([], "The_N. The_NNDoC is the_N.").text == GENERIC_CLARIFICATION


async def test_no_degenerate_reply_reaches_a_user_for_any_odd_message(
    store: Store, request: pytest.FixtureRequest
) -> None:
    assert len(OOD_MESSAGES) >= 50
    babbling: Policy = request.getfixturevalue("tiny_policy")  # the tiny model's prompted base policy
    for policy in (babbling, ScriptedPolicy()):  # a babbling model, and one that echoes the message back
        service = DialogueService(
            store=store,
            policies=PolicyHolder(policy),
            task=load_task("travel"),
            settings=Settings(_env_file=None, max_message_chars=4000),
        )
        sent: list[str] = []
        for index, message in enumerate(OOD_MESSAGES):
            chat = ChatRef(platform="telegram", chat_id=str(1000 + index), user_id=str(index))
            replies = await service.handle_message(chat, message)
            sent += [r.text for r in replies if r.turn_id is not None]
        await service.shutdown()
        assert len(sent) >= len(OOD_MESSAGES) - 3  # one reply each (a refused message aside)
        assert [text for text in sent if degenerate(text)] == []
    clarified = [text for text in sent if text.startswith("Sorry, I didn't quite get that.")]
    assert clarified  # the echoing policy's odd replies were caught, not just lucky
