"""Parsing what LLMs actually write into alternating turns, or a rejection with a countable reason."""

from __future__ import annotations

import pytest

from imagine.parsing import DialogueParseError, extract_json, fingerprint, parse_dialogue, single_turn
from imagine.task import load_task

TRAVEL = load_task("travel")
OPENING = TRAVEL.opening_line


def parse(text: str, **options):
    kwargs = {
        "user_labels": TRAVEL.user_aliases,
        "agent_labels": TRAVEL.agent_aliases,
        "opening_line": OPENING,
        **options,
    }
    return parse_dialogue(text, **kwargs)


def test_plain_labels() -> None:
    parsed = parse("Agent: Hi there.\nUser: I want a beach.\nAgent: Try surfing.\nUser: Great, thanks!")
    assert parsed.turns == (
        ("agent", "Hi there."),
        ("user", "I want a beach."),
        ("agent", "Try surfing."),
        ("user", "Great, thanks!"),
    )
    assert parsed.repairs == () and parsed.agent_turns == 2


@pytest.mark.parametrize(
    "text",
    [
        "**Travel agent:** Hello.\n**Traveller:** Food, mostly.\n"
        "**Travel agent:** Try a market tour.\n**Traveller:** Yes!",
        "1. Agent: Hello.\n2. User: Food, mostly.\n3. Agent: Try a market tour.\n4. User: Yes!",
        "- AGENT - Hello.\n- user - Food, mostly.\n- Agent - Try a market tour.\n- User - Yes!",
        "[Agent] Hello.\n[Customer] Food, mostly.\n[Agent] Try a market tour.\n[Customer] Yes!",
        "> Assistant: Hello.\n> Human: Food, mostly.\n> Assistant: Try a market tour.\n> Human: Yes!",
        "Turn 1 (Agent): Hello.\nTurn 2 (User): Food, mostly.\nTurn 3 (Agent): Try a market tour.\nTurn 4 (User): Yes!",
        "Agent：Hello.\nUser 1：Food, mostly.\nAgent：Try a market tour.\nUser 1：Yes!",
        "Sure! Here it is:\n```text\nAgent: Hello.\nUser: Food, mostly.\n"
        "Agent: Try a market tour.\nUser: Yes!\n```\nEnjoy.",
        "Agent: *Hello.*\n\nUser: \"Food, mostly.\"\n(smiles)\n"
        "Agent: __Try a market tour.__\nUser: Yes!\n---\nNotes: fine",
    ],
    ids=["markdown-aliases", "numbered", "dashes-case", "brackets", "quoted-generic", "turn-numbers", "fullwidth",
         "fenced-with-prose", "emphasis-quotes-stage-separator"],
)  # fmt: skip
def test_speaker_label_variants(text: str) -> None:
    assert parse(text).turns == (
        ("agent", "Hello."),
        ("user", "Food, mostly."),
        ("agent", "Try a market tour."),
        ("user", "Yes!"),
    )


def test_multi_line_turns_are_joined_and_a_persona_name_becomes_the_user() -> None:
    text = "Agent: Hello,\nwhat trip?\nMaria: Food.\nI love food.\nAgent: Street food tour!\nMaria: Perfect."
    parsed = parse(text)
    assert parsed.turns[0] == ("agent", "Hello, what trip?")
    assert parsed.turns[1] == ("user", "Food. I love food.")
    assert [role for role, _ in parsed.turns] == ["agent", "user", "agent", "user"]


def test_two_unknown_names_first_speaker_is_the_agent() -> None:
    parsed = parse("Sam: What trip?\nMaria: Food.\nSam: Market tour.\nMaria: Lovely.")
    assert [role for role, _ in parsed.turns] == ["agent", "user", "agent", "user"]
    assert parsed.turns[1] == ("user", "Food.")


def test_same_speaker_twice_is_merged_and_counted() -> None:
    parsed = parse("Agent: Hi.\nUser: Beach.\nUser: Cheap.\nAgent: Camping.\nAgent: Or hostels.\nUser: Ok.")
    assert parsed.turns == (
        ("agent", "Hi."),
        ("user", "Beach. Cheap."),
        ("agent", "Camping. Or hostels."),
        ("user", "Ok."),
    )
    assert parsed.repairs.count("merged_same_speaker") == 2


def test_missing_opening_line_is_put_back() -> None:
    parsed = parse("User: I like art.\nAgent: Try the Louvre.\nUser: Nice.")
    assert parsed.turns[0] == ("agent", OPENING)
    assert "added_opening_line" in parsed.repairs
    with pytest.raises(DialogueParseError) as error:
        parse_dialogue("User: I like art.\nAgent: Try the Louvre.\nUser: Nice.")
    assert error.value.reason == "starts_with_user"


def test_empty_labelled_turns_are_dropped() -> None:
    parsed = parse("Agent: Hi.\nUser:\nUser: Beach.\nAgent: Surf.\nUser: Yes.")
    assert parsed.turns[1] == ("user", "Beach.") and "dropped_empty_turn" in parsed.repairs


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n\n  ", "empty"),
        ("I'm sorry, I can't write that conversation.", "no_speaker_labels"),
        ("Agent: Hi.\nUser: Hello.", "too_short"),
        ("Agent: Hi.\nAgent: Anyone?\nAgent: Hello?", "too_short"),
        ("Agent:\nUser:\n", "empty"),
        ("\n".join(f"Agent: q{i}\nUser: a{i}" for i in range(12)), "too_long"),
        ("Agent: Hi.\nUser: " + "blah " * 400 + "\nAgent: Ok.\nUser: Ok.", "turn_too_long"),
    ],
    ids=["empty", "whitespace", "refusal", "one-agent-turn", "no-user", "labels-only", "too-long", "huge-turn"],
)
def test_malformed_dialogues_are_rejected_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(DialogueParseError) as error:
        parse(text, max_agent_turns=8)
    assert error.value.reason == reason


def test_single_turn_cuts_a_small_models_rambling() -> None:
    assert single_turn("User: I like hiking.\nAgent: Great, what else?") == "I like hiking."
    assert single_turn("\n\n**I love** food.\n\nAlso, museums.") == "I love food."
    assert single_turn("Traveller: cheap please", labels=["Traveller"]) == "cheap please"
    long = "This is a sentence. " * 40
    cut = single_turn(long, max_chars=100)
    assert len(cut) <= 100 and cut.endswith(".")
    assert single_turn("") == ""


def test_extract_json_tolerates_fences_prose_and_trailing_commas() -> None:
    assert extract_json('```json\n{"a": [1, 2,],}\n```') == {"a": [1, 2]}
    assert extract_json('Here you go: {"x": "a}b", "y": {"z": 1}} Thanks!') == {"x": "a}b", "y": {"z": 1}}
    assert extract_json("[1, 2]") == [1, 2]
    for bad in ("", "no json here", '{"a": '):
        with pytest.raises(DialogueParseError) as error:
            extract_json(bad)
        assert error.value.reason == "bad_json"


def test_fingerprint_ignores_case_and_spacing_only() -> None:
    a = (("agent", "Hi  there"), ("user", "Beach"))
    assert fingerprint(a) == fingerprint((("agent", "hi there"), ("user", "beach")))
    assert fingerprint(a) != fingerprint((("agent", "Hi there"), ("user", "Mountains")))
