"""The imagination pipeline end to end with the real ``openai`` client against the fake server, into storage."""

from __future__ import annotations

import json

from imagine.backends import make_backend
from imagine.engine import ImaginationEngine, ImagineConfig, ImagineEvent
from imagine.task import load_task
from storage import Store
from tests.fakes.openai_server import FakeOpenAIServer, ImaginationResponder

TRAVEL = load_task("travel")


def engine(server: FakeOpenAIServer, store: Store | None, **config) -> ImaginationEngine:
    chat = make_backend("openai", base_url=server.base_url, model="fake-model", backoff_s=0.01, max_retries=2)
    return ImaginationEngine(TRAVEL, chat, store=store, config=ImagineConfig(concurrency=4, seed=7, **config))


async def test_dialogues_are_imagined_critiqued_and_stored(store: Store) -> None:
    responder = ImaginationResponder(messy=True)
    async with FakeOpenAIServer(responder) as server:
        events: list[ImagineEvent] = []
        report = await engine(server, store, run_id="r1").run(6, on_event=events.append)
    assert report.accepted == 6 and report.total == 6 and not report.rejected and report.stopped_early is None
    assert [e.accepted for e in events] == [True] * 6
    assert responder.calls["dialogue"] == 6 and responder.calls["critique"] == 6 and responder.calls["personas"] >= 1
    assert report.usage["requests"] == sum(responder.calls.values()) and report.usage["completion_tokens"] > 0
    stored = await store.dialogues_for_training(sources=["imagined"], task="travel")
    assert len(stored) == 6
    for record in stored:
        assert [t.role for t in record.turns] == ["agent", "user"] * 3
        assert record.turns[0].text == TRAVEL.opening_line
        assert record.turns[2].text == "What do you enjoy doing most on holiday?"  # the critique's revision
        assert record.meta["backend"] == "openai" and record.meta["model"] == "fake-model"
        assert record.meta["critique"] == "revised" and record.meta["run_id"] == "r1"
        assert record.persona is not None and record.persona["origin"] == "llm"
        assert ("perfect" in record.turns[-1].text) == (record.reward == 1.0)
    assert len({json.dumps(r.persona, sort_keys=True) for r in stored}) == 6  # personas are distinct
    assert {r.reward for r in stored} == {0.0, 1.0}


async def test_an_interrupted_run_resumes_up_to_n(store: Store) -> None:
    async with FakeOpenAIServer(ImaginationResponder()) as server:
        first = await engine(server, store, run_id="resume").run(3)
        second = await engine(server, store, run_id="resume").run(5)
        third = await engine(server, store, run_id="resume").run(5)
        other = await engine(server, store, run_id="other").run(2)
    assert (first.accepted, second.already_done, second.accepted) == (3, 3, 2)
    assert (third.already_done, third.accepted, third.attempts) == (5, 0, 0)
    assert (other.already_done, other.accepted) == (0, 2)
    stored = await store.dialogues_for_training(sources=["imagined"])
    resumed = [r for r in stored if r.meta["run_id"] == "resume"]
    assert sorted(r.meta["index"] for r in resumed) == [0, 1, 2, 3, 4]
    assert len({r.meta["persona_key"] for r in resumed}) == 5  # the resumed run avoided earlier personas


async def test_unusable_output_is_rejected_and_counted_never_crashing() -> None:
    replies = iter(["", "no labels at all", "Agent: Hi.\nUser: ok.", "Agent: Hi.\nUser: hmm"] * 50)

    def responder(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if '"personas"' in prompt:
            return "not json"  # personas fall back to sampling from the task's hints
        return next(replies)

    async with FakeOpenAIServer(responder) as server:
        report = await engine(server, None, critique=False, max_attempts_per_dialogue=2).run(4)
    assert report.accepted == 0 and report.attempts == 8
    assert report.rejected == {"empty": 2, "no_speaker_labels": 2, "too_short": 4}
    assert report.stopped_early is not None and "gave up" in report.stopped_early
    assert report.persona_fallbacks == 8


async def test_a_failing_server_stops_the_run_early_with_the_reason() -> None:
    async with FakeOpenAIServer(ImaginationResponder()) as server:
        server.fail_next(500, times=1000)
        report = await engine(server, None, max_errors_before_first_success=3).run(50)
    assert report.accepted == 0 and report.rejected["backend_error"] >= 3
    assert report.stopped_early is not None and "backend keeps failing" in report.stopped_early
    assert report.attempts < 20


async def test_critique_that_cannot_be_used_keeps_the_draft_and_no_critique_skips_it() -> None:
    responder = ImaginationResponder(critique_reply='{"problems": [], "revised": 42}')
    async with FakeOpenAIServer(responder) as server:
        kept = await engine(server, None).run(2)
        skipped = await engine(server, None, critique=False, run_id="nc").run(2)
    assert [d.meta["critique"] for d in kept.dialogues] == ["unusable", "unusable"]
    assert kept.dialogues[0].turns[2][1] == "What do you enjoy doing most?"  # the draft, unrevised
    assert [d.meta["critique"] for d in skipped.dialogues] == ["skipped", "skipped"]
    assert responder.calls["critique"] == 2


async def test_identical_dialogues_are_rejected_as_duplicates() -> None:
    dialogue = "Agent: Hi.\nUser: Beach.\nAgent: Surf lessons.\nUser: Great, thanks!"
    async with FakeOpenAIServer(lambda body: dialogue) as server:
        report = await engine(server, None, critique=False, max_attempts_per_dialogue=2).run(3)
    assert report.accepted == 1 and report.rejected["duplicate"] == 5


async def test_dialogues_of_world_personas_are_scored_by_the_worlds_judge(store: Store) -> None:
    """Free-form LLM dialogues are mixed with the compiled world's: where the persona names a value for every
    preference (here: personas sampled from the hints, the server's persona answers being junk), the world judges
    the last act, whatever outcome the dialogue was written for."""

    class HintPersonas(ImaginationResponder):
        def _personas(self, prompt: str) -> str:
            return "no personas today"

    async with FakeOpenAIServer(HintPersonas()) as server:
        report = await engine(server, store, run_id="judged").run(6)
    assert report.accepted == 6
    stored = await store.dialogues_for_training(sources=["imagined"], task="travel")
    assert all(r.persona["origin"] == "hints" and r.meta["judge"] == "world" for r in stored)
    assert {r.meta["intended_reward"] for r in stored} == {0, 1}
    # "a guided walking tour" is nothing the world knows a traveller for: a misfit, even when written as a success
    assert {r.reward for r in stored} == {0.0}
