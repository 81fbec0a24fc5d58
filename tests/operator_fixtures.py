"""A serving runtime with history for the operator page's tests: three trained versions (v3 serving, v2 before it),
two improvement runs, real conversations with rewards and 👍/👎, and the improvement loop behind ``/rollback``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bot.improve import ImprovementLoop
from bot.policy_holder import PolicyHolder
from bot.server import Runtime
from bot.settings import Settings
from bot.web.metrics import BotMetrics, MeteredDialogueService
from imagine.task import load_task
from learning.interface import History
from storage import ConversationStatus, FeedbackKind, Role, RunStatus, Source, Store
from tests.fakes.ports import free_port

TASK = load_task("travel")
ADMIN_TOKEN = "operator-token-3f9a1c7e"


class VersionPolicy:
    """A policy that only says which version it is."""

    def __init__(self, version_id: int | None) -> None:
        self.version_id = version_id
        self.name = f"v{version_id}" if version_id is not None else "base"

    def respond_batch(self, histories: Sequence[History], *, seed: int | None = None) -> list[str]:
        return [self.name for _ in histories]

    async def respond(self, history: History) -> str:
        return self.name

    def close(self) -> None:
        pass


async def runtime_with_history(store: Store, tmp_path: Path, *, admin_token: str | None = ADMIN_TOKEN) -> Runtime:
    """The runtime (HTTP on a free port, ``admin_token`` or none) over a database with some history."""
    versions = []
    for number, success in enumerate((0.42, 0.55, 0.61), start=1):
        checkpoint = tmp_path / f"policies/v{number}"
        checkpoint.mkdir(parents=True)
        version = await store.register_policy_version(
            path=str(checkpoint), sha256=f"{number:064d}", base_model="tiny", algorithm="ilql",
            metrics={"success_rate": success, "active_success_rate": success - 0.05, "paired_difference": 0.05,
                     "paired_ci_low": -0.01, "paired_ci_high": 0.11},
        )  # fmt: skip
        assert version.id is not None
        await store.activate_policy_version(version.id)
        versions.append(version)
    for status, difference in ((RunStatus.SUCCEEDED, 0.05), (RunStatus.REJECTED, -0.08)):
        run = await store.start_training_run(trigger="schedule")
        assert run.id is not None
        await store.update_training_run(
            run.id, status=status, n_imagined=400, n_real=12,
            metrics={"paired_difference": difference, "duration_s": 812.0, "train_s": 640.0,
                     "decision": "promoted" if status == RunStatus.SUCCEEDED else "not better"},
        )  # fmt: skip
    for number, reward in enumerate((1.0, 0.0, None)):
        conversation = await store.start_conversation(
            source=Source.REAL, platform="telegram", task=TASK.name, chat_key=f"telegram:{number}",
            user_key=f"telegram:{number}",
        )  # fmt: skip
        assert conversation.id is not None
        await store.append_turn(conversation.id, Role.AGENT, TASK.opening_line)
        await store.append_turn(conversation.id, Role.USER, "to Rome")
        answer = await store.append_turn(conversation.id, Role.AGENT, "When?")
        await store.record_feedback(
            conversation_id=conversation.id, user_key=f"telegram:{number}", kind=FeedbackKind.THUMBS,
            value=1.0 if number != 1 else -1.0, turn_id=answer.id,
        )  # fmt: skip
        if reward is not None:
            await store.close_conversation(
                conversation.id, reward=reward, reward_source="user", status=ConversationStatus.CLOSED
            )
    settings = Settings(
        _env_file=None, data_dir=tmp_path, http_port=free_port(), http_host="127.0.0.1", admin_token=admin_token,
        improve_enabled=False,
    )  # fmt: skip
    metrics = BotMetrics()

    def load(source: str, version_id: int | None) -> VersionPolicy:
        return VersionPolicy(version_id)

    policies = PolicyHolder(VersionPolicy(versions[-1].id))
    service = MeteredDialogueService(metrics=metrics, store=store, policies=policies, task=TASK, settings=settings)
    service.improver = ImprovementLoop(store=store, settings=settings, task=TASK, holder=policies, load_policy=load)
    return Runtime(settings, store, TASK, policies, service, load, metrics)
