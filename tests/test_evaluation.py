"""The evaluation runner, reports, the LLM-driven user and ``reverie eval``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from typer.testing import CliRunner

from imagine.conversation import FinalAct
from imagine.simulated import BehaviourPolicy, LLMUser
from imagine.simulated.llm_user import END_MARKER, parse_judgement
from imagine.task import load_task
from imagine.world import world_for
from learning.evaluation import evaluate, evaluate_async, paired_difference, wilson_interval
from learning.interface import Message
from learning.report import write_report
from storage import Store

TRAVEL = load_task("travel")


class RecordingPolicy:
    """A real policy (a scripted behaviour) that records how it was called."""

    version_id: int | None = None

    def __init__(self, behaviour: str = "careful", fail_at_call: int | None = None) -> None:
        self._inner = BehaviourPolicy("travel", behaviour)
        self.name = f"recording:{behaviour}"
        self.batch_sizes: list[int] = []
        self.fail_at_call = fail_at_call

    def respond_batch(self, histories: Sequence[Sequence[Message]], *, seed: int | None = None) -> list[str]:
        self.batch_sizes.append(len(histories))
        if self.fail_at_call is not None and len(self.batch_sizes) > self.fail_at_call:
            raise RuntimeError("out of memory")
        return self._inner.respond_batch(histories, seed=seed)

    async def respond(self, history: Sequence[Message]) -> str:
        return self.respond_batch([history])[0]

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (37, 100, 0.2818, 0.4678)],
)
def test_wilson_interval(successes: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=1e-4)


def test_every_policy_meets_the_same_personas_and_runs_in_lockstep() -> None:
    careful, eager = RecordingPolicy("careful"), RecordingPolicy("eager")
    report = evaluate([careful, eager], TRAVEL, episodes=40, seed=3, progress=False, batch_size=16)
    first, second = report.results
    assert [e.persona for e in first.episodes] == [e.persona for e in second.episodes]
    assert first.success_rate == 1.0 and second.success_rate < 0.5
    # opening, at most four questions (fewer when the user volunteers), a repeat after a vague answer, the act
    assert 3.0 <= first.mean_turns <= 6.5 and all(e.agent_turns <= TRAVEL.max_turns for e in first.episodes)
    assert first.re_ask_rate == 0.0  # the careful agent uses what the user volunteered
    # Lockstep: per agent turn one pass over all open episodes, in chunks of at most 16; the harness says the
    # opening line (as the bot does), so the policy is asked for every agent turn but that one.
    assert careful.batch_sizes[:3] == [16, 16, 8]
    assert sum(careful.batch_sizes) == sum(e.agent_turns - 1 for e in first.episodes)
    assert max(eager.batch_sizes) == 16
    assert sum(eager.batch_sizes) == sum(e.agent_turns - 1 for e in second.episodes)
    again = evaluate(
        [RecordingPolicy("careful"), RecordingPolicy("eager")],
        TRAVEL,
        episodes=40,
        seed=3,
        progress=False,
        batch_size=16,
    )
    assert [e.turns for r in again.results for e in r.episodes] == [e.turns for r in report.results for e in r.episodes]
    difference, low, high = paired_difference(first, second)
    assert difference == pytest.approx(first.mean_reward - second.mean_reward) and 0 < low <= difference <= high
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(first, evaluate([RecordingPolicy()], TRAVEL, episodes=5, progress=False).results[0])
    other_seed = evaluate([RecordingPolicy("careful")], TRAVEL, episodes=40, seed=4, progress=False)
    assert [e.persona for e in other_seed.results[0].episodes] != [e.persona for e in first.episodes]


def test_a_failing_policy_is_reported_and_does_not_stop_the_others() -> None:
    broken = RecordingPolicy("careful", fail_at_call=2)
    report = evaluate([broken, RecordingPolicy("careful")], TRAVEL, episodes=10, seed=0, progress=False)
    failed, fine = report.results
    assert failed.error is not None and "out of memory" in failed.error
    assert failed.success_rate == 0.0 and failed.outcomes() == {"policy_error": 10}
    assert fine.error is None and fine.success_rate == 1.0


def test_simulated_users_need_hints_with_values(tmp_path: Path) -> None:
    custom = TRAVEL.model_copy(update={"name": "museum", "persona_hints": ["taste"], "attributes": []})
    with pytest.raises(ValueError, match="'taste' lists no values"):
        evaluate([RecordingPolicy()], custom, episodes=2, progress=False)
    with pytest.raises(ValueError, match="backend"):
        evaluate([RecordingPolicy()], TRAVEL, users="llm", episodes=2, progress=False)


async def test_evaluation_episodes_are_stored_as_simulated_never_real(store: Store) -> None:
    report = await evaluate_async(
        [BehaviourPolicy("travel", "careful"), BehaviourPolicy("travel", "eager")],
        TRAVEL,
        episodes=6,
        seed=1,
        store=store,
        progress=False,
    )
    assert await store.count_conversations(source="evaluation", task="travel") == 12
    assert await store.count_conversations(source="real") == 0
    episode = report.results[1].episodes[2]
    assert episode.conversation_id is not None
    stored = await store.get_conversation(episode.conversation_id)
    assert stored is not None and stored.platform == "sim" and stored.reward == episode.reward
    assert stored.persona == episode.persona and stored.meta["policy"] == "scripted:eager"
    assert [(t.role, t.text) for t in await store.get_turns(episode.conversation_id)] == episode.turns


def test_report_files(tmp_path: Path) -> None:
    policies = [BehaviourPolicy("teaching", name) for name in ("careful", "sloppy", "eager")]
    report = evaluate(policies, load_task("teaching"), episodes=30, seed=0, progress=False)
    files = write_report(report, tmp_path / "out")
    markdown = files.markdown.read_text()
    careful = report.result("scripted:careful")
    assert "| scripted:careful | 100.0 % |" in markdown and f"{100 * careful.interval[0]:.1f} %" in markdown
    assert "## Success by persona type" in markdown and "| no machine learning |" in markdown
    assert len(re.findall(r"^### scripted:sloppy, episode", markdown, flags=re.MULTILINE)) == 3
    assert "Hidden persona: knowledge level=" in markdown
    image = matplotlib.image.imread(files.plot)
    assert image.shape[0] > 300 and image.shape[1] > 600
    summary = json.loads(files.json.read_text())
    assert [p["name"] for p in summary["policies"]] == ["scripted:careful", "scripted:sloppy", "scripted:eager"]
    assert summary["policies"][0]["success_rate"] == 1.0


def _hidden_persona(text: str) -> dict[str, str]:
    """The ``key: value; key: value`` persona an LLM user's prompt (or its judge's) carries, up to the line's end."""
    line = text.split("\n")[0].rstrip(".")
    return dict(part.split(": ", 1) for part in line.split("; "))


class PersonaPlayingChat:
    """A scripted chat backend implementing the LLM users' protocol: it plays the user from the hidden
    prompt (answers in free words with the persona's value when a question names a dimension) and judges by the
    world's rule."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, str]]] = []

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.8) -> str:
        self.calls.append(messages)
        system = messages[0]["content"]
        world = world_for("travel")
        if "judge" in system:
            prompt = messages[-1]["content"]
            persona = _hidden_persona(prompt.split("(the agent could not see it): ")[1])
            agent_lines = [line for line in prompt.splitlines() if line.startswith("Agent:")]
            fits = world.act_fits(persona, FinalAct(agent_lines[-1].lower()))
            return json.dumps({"reward": int(fits), "reason": "rule"})
        persona = _hidden_persona(system.split("Your hidden persona: ")[1])
        agent = messages[-1]["content"]
        assert messages[-1]["role"] == "user"  # the agent speaks as "user" to the user model
        if world.final_act(agent) is not None:
            return f"Thanks! {END_MARKER}"
        asked = world.asked_attributes(agent)
        # Free-form answers, not the world's phrasings: scripted agents must read them by the values' words.
        return " ".join(f"As for {name}, {persona[name]}." for name in asked) or "A trip."


async def test_llm_users_play_hidden_personas_and_the_judge_scores() -> None:
    chat = PersonaPlayingChat()
    report = await evaluate_async(
        [BehaviourPolicy("travel", "careful")], TRAVEL, users="llm", episodes=4, seed=0, backend=chat, progress=False
    )
    result = report.results[0]
    assert result.success_rate == 1.0 and result.outcomes() == {"judged_success": 4}
    assert all(END_MARKER not in text for e in result.episodes for _, text in e.turns)
    user_prompts = [call[0]["content"] for call in chat.calls if "judge" not in call[0]["content"]]
    assert "Your hidden persona: main interest:" in user_prompts[0]


async def test_llm_user_ends_and_scores_once() -> None:
    class Fixed:
        def __init__(self, replies: list[str]) -> None:
            self.replies = replies

        async def complete(self, messages: list[dict[str, str]], **options: object) -> str:
            return self.replies.pop(0)

    user = LLMUser(Fixed([f"Lovely, booked! {END_MARKER}"]), TRAVEL, {"interest": "food"}, judge=Fixed(["nonsense"]))
    turn = await user.reply("Try the street food tour.")
    assert turn.done and turn.text == "Lovely, booked!"
    assert await user.score() == 0.0 and "unparseable" in user.reason
    assert await user.score() == 0.0  # the judge is asked once (a second call would pop an empty list)
    with pytest.raises(RuntimeError):
        await user.reply("Hello?")


async def test_llm_users_on_a_task_without_a_world_get_invented_personas() -> None:
    class Improviser:
        """Invents a persona from the episode number, ends every episode at once, judges by persona."""

        async def complete(self, messages: list[dict[str, str]], **options: object) -> str:
            text = messages[-1]["content"]
            if text.startswith("Invent user #"):
                number = int(text.removeprefix("Invent user #").split(" ")[0])
                return f'Here: {{"interest": "art", "visitor": {number}}}'
            if "judge" in messages[0]["content"]:
                return json.dumps({"reward": int("visitor: 2" in text)})
            return f"Fine. {END_MARKER}"

    museum = TRAVEL.model_copy(update={"name": "museum", "persona_hints": ["taste in art"], "attributes": []})
    policies = [BehaviourPolicy("travel", "careful"), BehaviourPolicy("travel", "eager")]
    report = await evaluate_async(policies, museum, users="llm", episodes=3, backend=Improviser(), progress=False)
    for result in report.results:
        assert [e.persona for e in result.episodes] == [{"interest": "art", "visitor": n} for n in range(3)]
        assert [e.reward for e in result.episodes] == [0.0, 0.0, 1.0]
        assert all(e.agent_turns == 1 for e in result.episodes)


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        ('{"reward": 1, "reason": "fits"}', 1.0),
        ('Sure! ```json\n{"reward": 0, "reason": "wrong"}\n```', 0.0),
        ('{"reward": 0.5}', 0.5),
        ("reward: 1", 1.0),
        ('{"reward": 7}', 1.0),
        ("I think so", 0.0),
    ],
)
def test_parse_judgement(text: str, reward: float) -> None:
    assert parse_judgement(text)[0] == reward


def test_eval_command_writes_a_report_and_stores_episodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    args = ["eval", "--task", "travel", "--policy", "scripted:careful", "--policy", "scripted:eager"]
    result = CliRunner().invoke(app, [*args, "--episodes", "12", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.png").stat().st_size > 10_000
    assert (tmp_path / "data" / "reverie.db").is_file()
    bad = CliRunner().invoke(app, ["eval", "--task", "travel", "--policy", "scripted:genius", "--no-store"])
    assert bad.exit_code == 2 and "unknown scripted behaviour" in bad.output


def test_eval_command_with_llm_users_on_an_openai_compatible_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``reverie eval --users llm``: the real openai client plays users and judge against the fake server."""
    from bot.cli import app
    from tests.fakes.openai_server import FakeOpenAIServer, serve_in_thread

    chat = PersonaPlayingChat()

    async def respond(body: dict[str, Any]) -> str:
        return await chat.complete(body["messages"])

    monkeypatch.chdir(tmp_path)
    with serve_in_thread(FakeOpenAIServer(respond)) as server:
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test", "DATA_DIR": str(tmp_path / "data")}
        args = ["eval", "--task", "travel", "--policy", "scripted:careful", "--policy", "scripted:eager"]
        result = CliRunner().invoke(
            app,
            [*args, "--users", "llm", "--user-backend", "openai", "--episodes", "6", "--no-store", "--out", "out"],
            env=env,
        )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    rates = {p["name"]: p["success_rate"] for p in summary["policies"]}
    assert rates["scripted:careful"] == 1.0 and rates["scripted:careful"] > rates["scripted:eager"]
    assert any("judge" in r["messages"][0]["content"] for r in server.requests)  # the judge scored over HTTP
    assert all(r["messages"][-1]["content"] for r in server.requests)


def test_base_policy_from_a_tiny_model_can_be_evaluated(tmp_path: Path) -> None:
    from learning.policy import load_policy

    policy = load_policy("base", task=TRAVEL, base_model="tiny", max_new_tokens=6)
    try:
        # Two agent turns keep the random tiny model cheap; the careful agent cannot finish in two either.
        policies = [policy, BehaviourPolicy("travel", "careful")]
        report = evaluate(policies, TRAVEL, episodes=3, seed=0, progress=False, max_turns=2)
    finally:
        policy.close()
    base, careful = report.results
    assert base.n == 3 and all(e.turns and e.turns[0][0] == "agent" and e.agent_turns <= 2 for e in base.episodes)
    assert careful.outcomes() == {"turn_limit": 3} and careful.success_rate == 0.0
    assert "| base" in write_report(report, tmp_path).markdown.read_text()
