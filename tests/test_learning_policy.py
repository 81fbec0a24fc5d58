"""Training + inference end to end on the tiny model: ILQL finds a rewarded action that BC does not take,
policies load from checkpoints (and refuse bad ones), micro-batching, the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bot.cli import app
from imagine.simulated import generate_scripted_dialogues
from imagine.task import load_task
from learning.base_model import tiny_model
from learning.checkpoint import load_manifest, save_checkpoint
from learning.ilql import ILQLConfig
from learning.interface import Message, Policy
from learning.policy import PolicyLoadError, load_policy
from learning.training import TrainConfig, train
from storage import DialogueRecord, TurnRecord

TASK = load_task("travel")
HISTORY = [Message("agent", TASK.opening_line), Message("user", "hello")]
# single-token replies: the random tiny model keeps their hidden states well apart (multi-token words can collapse)
COMMON, RARE = "2", "7"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP stalls on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rare_reward_dialogues(n: int = 40) -> list[DialogueRecord]:
    """After "hello" the agent says COMMON (80 %, reward 0) or RARE (20 %, reward 1)."""
    records = []
    for index in range(n):
        rewarded = index % 5 == 0
        turns = (
            TurnRecord("agent", TASK.opening_line),
            TurnRecord("user", "hello"),
            TurnRecord("agent", RARE if rewarded else COMMON),
            TurnRecord("user", "okay"),
        )
        records.append(DialogueRecord(id=index, source="imagined", task="travel", turns=turns, reward=float(rewarded)))
    return records


@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with embeddings ×25, saved as a local base model directory.

    The stock tiny model's embeddings (std 0.02) are drowned by its residual stream: LoRA cannot make its
    next-token distribution peaked and its hidden states hardly depend on which token came last.
    """
    model, tokenizer = tiny_model()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25.0)
    directory = tmp_path_factory.mktemp("sharp-tiny")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, sharp_tiny: str, one_thread: None) -> dict[str, Path]:
    """BC, then token- and utterance-level ILQL whose policy stage is that BC checkpoint."""
    root = tmp_path_factory.mktemp("checkpoints")
    data = rare_reward_dialogues()
    common = {"base_model": sharp_tiny, "batch_size": 8, "lr": 1e-2, "value_lr": 1e-2, "value_batch_size": 128}
    bc = train(TrainConfig(algorithm="bc", steps=60, **common), data, out_dir=root / "bc", progress=False)
    out = {"bc": bc}
    for level in ("token", "utterance"):
        config = TrainConfig(
            algorithm=f"ilql-{level}", steps=0, value_steps=200, ilql=ILQLConfig(level=level), **common
        )
        out[level] = train(config, data, out_dir=root / level, init_from=bc, progress=False)
    awr = TrainConfig(algorithm="critic-awr", **common)
    awr.critic.steps, awr.critic.lr, awr.critic.actor_steps = 200, 1e-2, 60
    out["critic-awr"] = train(awr, data, out_dir=root / "critic-awr", init_from=bc, progress=False)
    return out


def test_critic_awr_distils_the_rare_rewarded_reply_into_the_actor(
    checkpoints: dict[str, Path], sharp_tiny: str
) -> None:
    """The per-turn critic values the rare reply above the common one, and advantage weighting makes the actor
    itself say it: plain decoding, no value heads in the checkpoint (it serves at BC's cost)."""
    directory = checkpoints["critic-awr"]
    assert not (directory / "heads.safetensors").exists()
    metrics = load_manifest(directory)["metrics"]
    assert metrics["A_success"] > 0.3 > -0.1 > metrics["A_failure"]
    awr = load_policy(directory, task=TASK, base_model=sharp_tiny, temperature=0.0, max_new_tokens=3)
    try:
        assert awr.decode_config.beta == 0.0 and awr.decode_config.candidates == 1
        assert awr.respond_batch([HISTORY])[0] == RARE
    finally:
        awr.close()


def test_the_adapted_critic_also_values_the_rare_rewarded_reply(
    checkpoints: dict[str, Path], sharp_tiny: str, tmp_path: Path
) -> None:
    """The critic with its own LoRA on the upper layers (``features="adapted"``) learns the same preference as the
    frozen-feature default and hands its advantages to the actor the same way."""
    config = TrainConfig(algorithm="critic-awr", base_model=sharp_tiny, batch_size=8, lr=1e-2)
    config.critic.features, config.critic.steps, config.critic.lr, config.critic.actor_steps = "adapted", 150, 3e-3, 2
    out = train(config, rare_reward_dialogues(), out_dir=tmp_path / "awr", init_from=checkpoints["bc"], progress=False)
    metrics = load_manifest(out)["metrics"]
    assert 0 < metrics["critic_steps"] <= 150 and metrics["critic_seconds"] > 0
    assert metrics["A_success"] > 0.2 > metrics["A_failure"]
    assert metrics["weight_share_success"] > 0.5 and metrics["policy_steps"] == 2


def test_critic_awr_from_the_base_model_imitates_first_then_trains_the_actor(tmp_path: Path, sharp_tiny: str) -> None:
    """The benchmarked recipe in one call: filtered-BC steps, then the critic-weighted actor from that adapter; the
    warm-up checkpoint is a temporary that does not outlive the run."""
    config = TrainConfig(algorithm="critic-awr", steps=6, base_model=sharp_tiny, batch_size=8, lr=1e-2)
    config.critic.steps, config.critic.actor_steps = 20, 4
    out = train(config, rare_reward_dialogues(), out_dir=tmp_path / "awr", progress=False)
    manifest = load_manifest(out)
    assert manifest["algorithm"] == "critic-awr"
    assert manifest["metrics"]["imitation_algorithm"] == "fbc"
    assert manifest["metrics"]["imitation_steps"] == 6 and manifest["metrics"]["policy_steps"] == 4
    assert manifest["metrics"]["train_seconds"] >= manifest["metrics"]["imitation_seconds"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["awr"]


def test_imitation_stops_once_the_probe_fits_but_the_actor_runs_its_steps(tmp_path: Path, sharp_tiny: str) -> None:
    """The imitation phase's length follows the task probe: with a target every probe meets, it stops at its first
    held-out evaluation (and keeps those weights); the critic-weighted actor after it still runs all its steps."""
    data = generate_scripted_dialogues("travel", 100, seed=3)
    config = TrainConfig(
        algorithm="critic-awr",
        steps=12,
        eval_every=3,
        held_out=0.3,
        fit_target=0.0,
        base_model=sharp_tiny,
        batch_size=8,
    )
    config.critic.steps, config.critic.actor_steps = 10, 5
    metrics = load_manifest(train(config, data, out_dir=tmp_path / "awr", progress=False))["metrics"]
    assert metrics["imitation_steps"] == 3 and metrics["imitation_stopped_at_fit_target"]
    assert [point["step"] for point in metrics["imitation_held_out_curve"]] == [3]
    assert metrics["policy_steps"] == 5 and not metrics["stopped_at_fit_target"]
    unreachable = TrainConfig(
        algorithm="fbc", steps=6, eval_every=3, held_out=0.3, fit_target=1.01, base_model=sharp_tiny
    )
    fbc = load_manifest(train(unreachable, data, out_dir=tmp_path / "fbc", progress=False))["metrics"]
    assert fbc["policy_steps"] == 6 and not fbc["stopped_at_fit_target"]
    assert [point["step"] for point in fbc["held_out_curve"]] == [3, 6]
    assert "fit_at_full_knowledge" in fbc["held_out_curve"][0]


def test_plain_bc_runs_to_its_held_out_optimum_whatever_the_probe_says(tmp_path: Path, sharp_tiny: str) -> None:
    """Plain BC must reproduce the data, sampled replies included, which the greedy probe does not measure: a fit
    target every probe meets stops filtered BC at its first evaluation but not BC."""
    data = generate_scripted_dialogues("travel", 100, seed=3)
    runs = {
        name: TrainConfig(
            algorithm=name, steps=6, eval_every=3, held_out=0.3, fit_target=0.0, patience=0, base_model=sharp_tiny
        )
        for name in ("bc", "fbc")
    }
    metrics = {
        name: load_manifest(train(config, data, out_dir=tmp_path / name, progress=False))["metrics"]
        for name, config in runs.items()
    }
    assert metrics["fbc"]["policy_steps"] == 3 and metrics["fbc"]["stopped_at_fit_target"]
    assert metrics["bc"]["policy_steps"] == 6 and not metrics["bc"]["stopped_at_fit_target"]
    assert "fit_at_full_knowledge" in metrics["bc"]["held_out_curve"][0]  # still logged, only not a stop


def test_ilql_decoding_picks_the_rare_rewarded_reply_that_bc_does_not(
    checkpoints: dict[str, Path], sharp_tiny: str
) -> None:
    bc = load_policy(checkpoints["bc"], task=TASK, base_model=sharp_tiny, temperature=0.0, max_new_tokens=3)
    token = load_policy(checkpoints["token"], task=TASK, base_model=sharp_tiny, temperature=0.0, max_new_tokens=3)
    try:
        assert bc.respond_batch([HISTORY])[0] == COMMON  # imitation: the common, unrewarded reply
        assert token.respond_batch([HISTORY])[0] == RARE  # log π + β·(Q̄ − V) prefers the rewarded one
        token_without_values = load_policy(
            checkpoints["token"], task=TASK, base_model=sharp_tiny, temperature=0.0, max_new_tokens=3, beta=0.0
        )
        assert token_without_values.respond_batch([HISTORY])[0] == COMMON  # β = 0 is BC again
    finally:
        bc.close()
        token.close()
    # utterance level: K replies sampled from π (top-3 tokens), the best Q̄(s, u) − V(s) kept
    utterance = load_policy(
        checkpoints["utterance"],
        task=TASK,
        base_model=sharp_tiny,
        temperature=1.0,
        top_k=3,
        max_new_tokens=3,
        candidates=16,
    )
    try:
        replies = utterance.respond_batch([HISTORY] * 6, seed=0)
        assert sum(r == RARE for r in replies) >= 5, replies
    finally:
        utterance.close()
    manifest = load_manifest(checkpoints["utterance"])
    assert manifest["algorithm"] == "ilql-utterance" and manifest["metrics"]["heads_parameters"] > 0


async def test_base_policy_replies_in_plain_text_and_micro_batches_concurrent_calls() -> None:
    policy = load_policy("base", task=TASK, base_model="tiny", max_new_tokens=6)
    policy.batcher._window = 0.2  # a generous window: the four calls below are queued within microseconds
    try:
        assert isinstance(policy, Policy) and policy.version_id is None and policy.name == "base"
        replies = await asyncio.gather(*(policy.respond(HISTORY) for _ in range(4)))
        assert len(replies) == 4 and all(r.strip() for r in replies)
        assert all("<|im" not in r for r in replies)
        assert policy.batcher.requests_served == 4 and policy.batcher.batches_served == 1
        assert policy.respond_batch([[]], seed=1)[0]  # an empty history still gets a reply
    finally:
        policy.close()
    with pytest.raises(RuntimeError, match="closed"):
        await policy.respond(HISTORY)


async def test_the_worker_decodes_with_the_policys_threads_and_follows_a_change() -> None:
    policy = load_policy("base", task=TASK, base_model="tiny", max_new_tokens=4, threads=1)
    caller_threads = torch.get_num_threads()
    try:
        assert policy.engine is not None and len(policy.engine.prefix) == 1  # the conversation start, pinned
        before = policy.engine.prefix.hit_tokens
        await policy.respond(HISTORY)
        assert policy.batcher.worker_threads == 1
        start, prompt = policy.conversation_start(), policy.prompt_ids(HISTORY)
        assert prompt[: len(start)] == start and len(prompt) > len(start) > 10
        assert policy.engine.prefix.hit_tokens - before == len(start)  # only the user's words were encoded
        policy.threads = 2
        await policy.respond([*HISTORY, Message("user", "and one more thing")])
        assert policy.batcher.worker_threads == 2 and policy.threads == 2
        assert torch.get_num_threads() == caller_threads  # sizes are per thread: the caller's stays as it was
    finally:
        policy.close()


def test_load_policy_refuses_missing_corrupt_and_mismatched_checkpoints(
    checkpoints: dict[str, Path], sharp_tiny: str, tmp_path: Path
) -> None:
    with pytest.raises(PolicyLoadError, match="no checkpoint directory"):
        load_policy(tmp_path / "nothing", task=TASK, base_model="tiny")
    with pytest.raises(PolicyLoadError, match="trained on base model"):
        load_policy(checkpoints["bc"], task=TASK, base_model="tiny")  # trained on the sharpened tiny model
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in checkpoints["bc"].iterdir():
        (corrupt / file.name).write_bytes(file.read_bytes())
    adapter = corrupt / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(PolicyLoadError, match="corrupt"):
        load_policy(corrupt, task=TASK, base_model=sharp_tiny)
    other = save_checkpoint(
        tmp_path / "other", write_files=lambda d: None, base_model="some/other-model", algorithm="bc", config={}
    )
    with pytest.raises(PolicyLoadError, match="trained on base model 'some/other-model'"):
        load_policy(other, task=TASK, base_model="tiny")


def test_cli_train_and_generate(tmp_path: Path, checkpoints: dict[str, Path], sharp_tiny: str) -> None:
    runner = CliRunner()
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rare_reward_dialogues(10)))
    out = tmp_path / "ckpt"
    args = ["train", "--algo", "fbc", "--base-model", "tiny", "--dialogues", str(dialogues), "--steps", "2"]
    result = runner.invoke(app, [*args, "--out", str(out), "--quiet", "--no-register"])  # no database here
    assert result.exit_code == 0, result.output
    assert load_manifest(out)["algorithm"] == "fbc" and load_manifest(out)["data"]["dialogues"] == 2

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["train", "--base-model", "tiny", "--dialogues", str(empty), "--out", str(out)])
    assert result.exit_code == 1 and "empty" in result.output
    unrewarded = tmp_path / "unrewarded.jsonl"
    unrewarded.write_text(json.dumps({"turns": [{"role": "agent", "text": "hi"}], "reward": None}) + "\n")
    result = runner.invoke(app, ["train", "--base-model", "tiny", "--dialogues", str(unrewarded)])
    assert result.exit_code == 1 and "reward" in result.output

    result = runner.invoke(
        app, ["generate", str(checkpoints["bc"]), "--base-model", sharp_tiny, "-t", "user: hello", "--temperature", "0"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == COMMON
    result = runner.invoke(app, ["generate", str(tmp_path / "missing"), "--base-model", "tiny"])
    assert result.exit_code == 1 and "no checkpoint directory" in result.output


@pytest.mark.smollm2
def test_smollm2_base_policy_replies_with_plain_text(model_cache_dir: Path) -> None:
    policy = load_policy("base", task=TASK, base_model="smollm2", cache_dir=model_cache_dir, max_new_tokens=12)
    try:
        reply = policy.respond_batch([HISTORY], seed=0)[0]
    finally:
        policy.close()
    assert reply.strip() and "<|im_" not in reply and "assistant" not in reply.split()[0]


async def test_batcher_skips_requests_whose_caller_gave_up() -> None:
    """A reply nobody waits for (the bot's timeout fired) is never generated, so later chats do not queue behind it."""
    import threading
    import time

    from learning.policy import MicroBatcher

    seen: list[str] = []
    busy = threading.Event()

    def slow_batch(histories: list) -> list[str]:
        busy.set()
        seen.extend(h[0].text for h in histories)
        time.sleep(0.5)
        return [f"reply to {h[0].text}" for h in histories]

    batcher = MicroBatcher(slow_batch, window_ms=1)
    first = asyncio.create_task(batcher.submit([Message("user", "first")]))
    await asyncio.to_thread(busy.wait, 5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.submit([Message("user", "abandoned")]), 0.1)
    third = await batcher.submit([Message("user", "third")])
    assert await first == "reply to first" and third == "reply to third"
    assert seen == ["first", "third"]
    batcher.close()


def test_close_interrupts_a_long_generation() -> None:
    import threading
    import time

    policy = load_policy("base", task=load_task("travel"), base_model="tiny", max_new_tokens=900, temperature=1.0)
    replies: list[str] = []
    worker = threading.Thread(target=lambda: replies.extend(policy.respond_batch([[Message("user", "hi")]] * 4)))
    worker.start()
    time.sleep(0.5)
    started = time.monotonic()
    policy.close()
    worker.join(30)
    assert not worker.is_alive() and time.monotonic() - started < 10
    assert len(replies) == 4  # what was generated so far (or the fallback), never an exception


def test_decode_stops_when_asked() -> None:
    from learning.decoding import DecodeConfig, decode

    model, tokenizer = tiny_model()
    prompt = tokenizer.encode("hello there")
    calls = 0

    def stop_after_three_steps() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    config = DecodeConfig(max_new_tokens=60, temperature=1.0, top_k=0, bf16=False)
    pad, end = tokenizer.pad_token_id, tokenizer.eos_token_id
    full = decode(
        model, [prompt] * 2, end_id=end, pad_id=pad, config=config, generator=torch.Generator().manual_seed(0)
    )
    cut = decode(
        model,
        [prompt] * 2,
        end_id=end,
        pad_id=pad,
        config=config,
        generator=torch.Generator().manual_seed(0),
        should_stop=stop_after_three_steps,
    )
    assert max(len(t) for t in full.tokens) > 3
    assert all(len(t) <= 3 for t in cut.tokens)


def test_repeats_encode_each_prompt_once_and_sample_as_if_it_were_copied() -> None:
    from learning.decoding import DecodeConfig, decode

    model, tokenizer = tiny_model()
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("a much longer prompt than the first one")]
    config = DecodeConfig(max_new_tokens=12, temperature=1.0, top_k=0, bf16=False)
    pad, end = tokenizer.pad_token_id, tokenizer.eos_token_id
    options = {"end_id": end, "pad_id": pad, "config": config, "collect_hidden": True}
    copied = decode(
        model, [p for p in prompts for _ in range(3)], generator=torch.Generator().manual_seed(1), **options
    )
    shared = decode(model, prompts, repeats=3, generator=torch.Generator().manual_seed(1), **options)
    assert shared.tokens == copied.tokens and len(shared.tokens) == 6
    assert len({tuple(t) for t in shared.tokens[:3]}) > 1  # three samples of one prompt, not one sample thrice
    assert torch.allclose(shared.state_hidden, copied.state_hidden, atol=1e-4)
    assert torch.allclose(shared.end_hidden, copied.end_hidden, atol=1e-4)


def test_load_policy_refuses_a_checkpoint_trained_on_other_prompts(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for file in checkpoints["bc"].iterdir():
        (old / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1  # before user turns carried the agent's notes
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PolicyLoadError, match="checkpoint format 1, but this Reverie reads format 2"):
        load_policy(old, task=TASK, base_model="tiny")
