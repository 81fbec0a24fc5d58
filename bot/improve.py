"""The improvement loop: imagine → select real → mix → train → evaluate → gate → hot-swap.

One :class:`ImprovementLoop` lives in the serving process. Heavy steps run as child processes
(:mod:`bot.subprocesses`), so chats stay responsive; training and evaluation get a typed job file and the
evaluation's report comes back typed (:mod:`bot.jobs`); every step is recorded in a ``TrainingRun``; a crash, a
time-out, a cancelled run or a worse candidate leaves the active policy serving. One trainer at a time across
replicas (:class:`storage.locks.TrainerLock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot import redaction
from bot.forgetting import RUN_INPUT, purge_forgotten
from bot.imagination import IMAGINED_PER_RUN, ImaginationChoice, choose_imagination, imagined_per_run, world_available
from bot.jobs import EvalJob, TrainJob, train_config, write_job
from bot.policy_holder import PolicyHolder
from bot.settings import Settings
from bot.subprocesses import StepFailedError, reverie_command, run_step
from imagine.task import TaskSpec
from learning.interface import Policy
from storage import PolicyStatus, PolicyVersion, RunStatus, Source, Store, TrainingRun
from storage.locks import TrainerLock
from storage.store import ForgottenDataError, PolicyChangedError

if TYPE_CHECKING:
    from bot.server import Runtime

logger = logging.getLogger(__name__)

#: The names the evaluation job gives the two policies it compares (the report is searched by them).
CANDIDATE, ACTIVE = "candidate", "active"
#: The job files of the train and evaluate steps, in the run directory.
TRAIN_JOB, EVAL_JOB = "train-job.json", "eval-job.json"


class ImprovementBusyError(RuntimeError):
    """Another improvement run holds the trainer lock (here or in another replica)."""


@dataclass(frozen=True)
class PairedDifference:
    """Candidate − active mean reward over the same held-out personas, with its 95 % interval
    (:func:`learning.evaluation.paired_difference`; with scripted users rewards are 0/1, so it is the difference
    of success rates)."""

    mean: float
    low: float
    high: float
    episodes: int

    @property
    def significantly_worse(self) -> bool:
        """The whole interval lies below 0: the candidate is worse, beyond chance."""
        return self.high < 0

    def describe(self) -> str:
        """E.g. ``paired difference -3.0 points (95 % CI -8.1 to +2.1) over 100 personas``."""
        return (
            f"paired difference {100 * self.mean:+.1f} points (95 % CI {100 * self.low:+.1f} to "
            f"{100 * self.high:+.1f}) over {self.episodes} personas"
        )

    def to_metrics(self) -> dict[str, float | int]:
        """The fields the run record and the version's metrics keep."""
        return {
            "paired_difference": self.mean,
            "paired_ci_low": self.low,
            "paired_ci_high": self.high,
            "eval_episodes": self.episodes,
        }


@dataclass(frozen=True)
class GateDecision:
    """Whether a candidate replaces the active policy, and why."""

    promote: bool
    candidate_success: float
    active_success: float
    margin: float
    paired: PairedDifference | None = None

    @property
    def reason(self) -> str:
        """One line for logs, ``/status`` and the run record."""
        verb = "promoted" if self.promote else "rejected"
        line = (
            f"{verb}: candidate success {self.candidate_success:.1%} vs active {self.active_success:.1%} "
            f"(margin {self.margin:.1%})"
        )
        if self.paired is not None:
            line += "; " + self.paired.describe()
            if self.paired.significantly_worse:
                line += ": significantly worse"
        return line


def gate(
    candidate_success: float, active_success: float, margin: float, paired: PairedDifference | None = None
) -> GateDecision:
    """Promote unless the candidate is worse than the active policy by more than ``margin``, and never when the
    paired difference over the same personas is significantly negative (its 95 % interval entirely below 0)."""
    promote = candidate_success >= active_success - margin
    if paired is not None and paired.significantly_worse:
        promote = False
    return GateDecision(promote, candidate_success, active_success, margin, paired)


@dataclass(frozen=True)
class GateInputs:
    """What the gate reads from the evaluation: both success rates and their paired difference."""

    candidate_success: float
    active_success: float
    paired: PairedDifference


def _gate_inputs(path: Path) -> GateInputs:
    """The candidate's and the active policy's results, found by name in the evaluation child's report."""
    from learning.evaluation import EvaluationReport, paired_difference

    try:
        report = EvaluationReport.from_json(path.read_text(encoding="utf-8"))
        candidate, active = report.result(CANDIDATE), report.result(ACTIVE)
        mean, low, high = paired_difference(candidate, active)
    except (OSError, ValueError, KeyError) as error:
        raise StepFailedError(f"evaluation report {path} is missing or malformed: {error}") from error
    return GateInputs(candidate.success_rate, active.success_rate, PairedDifference(mean, low, high, candidate.n))


async def register_checkpoint(
    store: Store,
    path: str | Path,
    *,
    metrics: dict[str, Any] | None = None,
    parent_id: int | None = None,
    expected_sha256: str | None = None,
) -> PolicyVersion:
    """Register a checkpoint directory as a candidate policy version (what the improvement loop does with every
    candidate, ``reverie train`` with what it trained and ``reverie policies add`` with any checkpoint).

    The checkpoint is verified first (every file against its manifest's sha256); its base model and algorithm come
    from the manifest; its path is stored absolute. ``expected_sha256``: the digest the caller verified earlier (the
    checkpoint must not have changed since). A path that is not an intact checkpoint raises
    :class:`learning.checkpoint.CheckpointError` and registers nothing. Registering the same checkpoint again
    returns its existing version.
    """
    from learning.checkpoint import CheckpointError, load_manifest, verify_checkpoint

    directory = Path(path).expanduser().resolve()

    def read() -> tuple[str, dict[str, Any]]:
        return verify_checkpoint(directory), load_manifest(directory)

    sha256, manifest = await asyncio.to_thread(read)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise CheckpointError(f"{directory}: changed since it was verified (manifest sha256 differs)")
    return await store.register_policy_version(
        path=str(directory),
        sha256=sha256,
        base_model=str(manifest["base_model"]),
        algorithm=str(manifest["algorithm"]),
        metrics=metrics,
        parent_id=parent_id,
    )


class ImprovementLoop:
    """Runs improvement runs and serves the admin commands (implements :class:`bot.events.Improver`).

    ``load_policy(path_or_"base", version_id)`` loads a policy for serving (blocking; run in a worker thread);
    without a ``holder`` (the CLI) nothing is served and nothing is swapped. ``serving_quiet(seconds)`` says
    whether serving has handled nothing for that long: the run's children are then lent the serving CPUs
    (``IMPROVE_LEND_CPUS_AFTER_S``; :func:`bot.subprocesses.run_step`).
    """

    def __init__(
        self,
        *,
        store: Store,
        settings: Settings,
        task: TaskSpec,
        holder: PolicyHolder | None = None,
        load_policy: Callable[[str, int | None], Policy] | None = None,
        serving_quiet: Callable[[float], bool] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.task = task
        self.holder = holder
        self.load_policy = load_policy
        self.serving_quiet = serving_quiet
        redaction.protect(settings)  # run records and step logs must not carry the secrets children get
        self.lock = TrainerLock(store.database)
        self._task: asyncio.Task[TrainingRun | None] | None = None
        self.next_run_time: Callable[[], Any] | None = None  # set by the server when a schedule exists
        #: Called with each step's name as it starts (the CLI shows it); must not block.
        self.on_step: Callable[[str], None] = lambda step: None

    async def _child(self, name: str, command: list[str], run_dir: Path, time_limit_s: float) -> None:
        """Run step ``name`` as a child (log ``<run_dir>/<name>.log``, the settings as its environment), lent the
        serving CPUs while serving is quiet; serving decodes with its share of the CPUs meanwhile."""
        log_path = run_dir / f"{name}.log"
        if self.holder is not None:  # serving keeps its share of the CPUs, the child gets the rest
            self.holder.set_threads(self.settings.resolved_torch_threads)
        try:
            await _step(
                name,
                command,
                log_path=log_path,
                time_limit_s=time_limit_s,
                env=self.settings.as_env(),
                lend_when=self._lend_when(),
            )
        finally:
            if self.holder is not None:
                self.holder.set_threads(self.settings.resolved_idle_torch_threads)

    def _lend_when(self) -> Callable[[], bool] | None:
        """When a child may have the serving CPUs too: serving quiet for ``IMPROVE_LEND_CPUS_AFTER_S``."""
        after = self.settings.improve_lend_cpus_after_s
        quiet = self.serving_quiet
        if quiet is None or after is None:
            return None
        return lambda: quiet(after)

    # --- the Improver protocol -------------------------------------------------------------------------

    async def request_run(self, *, trigger: str, requested_by: str) -> str:
        """Start a run in the background unless one is going; returns a message for the admin."""
        if self.running:
            return "An improvement run is already in progress; /status shows it."
        self._task = asyncio.create_task(self._run_logged(trigger), name=f"improvement-{trigger}")
        logger.info("improvement run requested by %s (%s)", requested_by, trigger)
        return "Improvement run started: imagine → train → evaluate → gate. /status shows progress."

    async def rollback(self, *, requested_by: str) -> str:
        """Step back to the version served before the active one (a stack; see ``Store.rollback_stack``).

        The rolled-back version never returns by rollback; below the first version lies the prompted base model,
        and a rollback from it has nothing to go back to. Versions whose checkpoint is gone are popped on the way.
        The new policy is loaded before anything changes, the change is one transaction that applies only if the
        active version is still the one read (two admins rolling back at once step back once each, not twice
        from the same place), and only then does it serve.
        """
        active = await self.store.active_policy_version()
        if active is None:
            return "Nothing to roll back: the prompted base model is serving."
        target: PolicyVersion | None = None
        skipped: list[PolicyVersion] = []
        for version in await self.store.rollback_stack():
            if Path(version.path).is_dir():
                target = version
                break
            skipped.append(version)
        try:
            policy = await self._load(target.path if target else None, target.id if target else None)
        except Exception as error:
            logger.exception("rollback by %s: version %s cannot be loaded", requested_by, target and target.id)
            return redaction.redact(
                f"Version {target.id if target else 'base'} cannot be loaded ({type(error).__name__}: {error}); "
                "nothing was changed."
            )
        try:
            await self.store.roll_back(
                active.id, target.id if target else None, skipped=[v.id for v in skipped if v.id]
            )
        except PolicyChangedError:
            _close(policy)
            return (
                "The active policy changed while rolling back (another rollback or a promotion); nothing was "
                "changed. /status shows what serves now."
            )
        except BaseException:
            _close(policy)
            raise
        self._serve(policy)
        gone = (
            f" (skipped version{'s' if len(skipped) > 1 else ''} {', '.join(str(v.id) for v in skipped)}: "
            "checkpoint deleted)"
            if skipped
            else ""
        )
        logger.info("rollback by %s: version %s → %s%s", requested_by, active.id, target.id if target else "base", gone)
        if target is None:
            return (
                f"Rolled back from version {active.id} to the prompted base model{gone}. "
                "There is nothing further to roll back to."
            )
        return f"Rolled back from version {active.id} to version {target.id} ({target.algorithm}){gone}."

    async def status_lines(self) -> list[str]:
        """Active version, last run, next scheduled run."""
        active = await self.store.active_policy_version()
        lines = [
            f"Active policy: version {active.id} ({active.algorithm}, {_metrics_summary(active.metrics)})"
            if active
            else "Active policy: prompted base model (no trained version yet)"
        ]
        last = await self.store.last_training_run()
        if last is not None:
            detail = last.error.splitlines()[0][:200] if last.error else last.metrics.get("decision", "")
            lines.append(
                f"Last run #{last.id} ({last.trigger}): {last.status}, started {last.started_at:%Y-%m-%d %H:%M} UTC"
                + (f" — {detail}" if detail else "")
            )
        else:
            lines.append("No improvement run yet.")
        if self.running:
            lines.append("A run is in progress now.")
        lines.append(self.imagination_line())
        if self.next_run_time is not None and (when := self.next_run_time()) is not None:
            lines.append(f"Next scheduled run: {when:%Y-%m-%d %H:%M} UTC")
        return lines

    def imagination(self) -> ImaginationChoice:
        """The imagination source of this loop's runs, and why (:func:`bot.imagination.choose_imagination`)."""
        return choose_imagination(self.settings, self.task)

    def imagined_per_run(self) -> int:
        """Fresh imagined dialogues per run (``IMPROVE_IMAGINED``, else the source's default)."""
        return imagined_per_run(self.settings, self.imagination())

    def imagination_line(self) -> str:
        """The ``/status`` line about imagination."""
        count = self.imagined_per_run()
        if count <= 0:
            return "Imagination: off (IMPROVE_IMAGINED=0): runs train on stored dialogues only"
        return f"Imagination: {count} dialogues per run from {self.imagination().describe()}"

    async def sync_active(self) -> bool:
        """Serve what the database says is active (a CLI ``activate``, another replica's promotion).

        Returns whether a swap happened. A version whose checkpoint cannot be loaded is left alone and logged.
        """
        if self.holder is None:
            return False
        active = await self.store.active_policy_version()
        wanted = active.id if active is not None else None
        if wanted == self.holder.version_id:
            return False
        try:
            await self._swap_in(active_source(active) if active else None, wanted)
        except Exception as error:  # keep serving the current policy
            logger.error("cannot load active policy version %s: %s", wanted, error)
            return False
        return True

    # --- running ---------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether this process has a run going."""
        return self._task is not None and not self._task.done()

    async def wait(self) -> TrainingRun | None:
        """Wait for the background run (if any) and return its record."""
        if self._task is None:
            return None
        return await asyncio.shield(self._task)

    async def shutdown(self) -> None:
        """Cancel a run in progress: its child process ends, the run is recorded as cancelled."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run_scheduled(self) -> None:
        """The scheduled job: one run, awaited (so the scheduler never overlaps runs), skipped if one is going."""
        if self.running:
            logger.info("scheduled improvement skipped: a run is in progress")
            return
        self._task = asyncio.create_task(self._run_logged("schedule"), name="improvement-schedule")
        await asyncio.shield(self._task)

    async def recover_after_crash(self) -> int:
        """Mark runs a crashed process left 'running' as failed and delete what they left on disk (their input
        with users' words, partial checkpoints), unless another replica is running one now."""
        if not await self.lock.acquire():
            return 0
        try:
            failed = await self.store.fail_unfinished_runs("the process running it stopped before it finished")
            # No run is in progress anywhere while we hold the lock, so every run directory is finished.
            for run_dir in sorted((self.settings.data_dir / "runs").glob("run-*")):
                await asyncio.to_thread(_remove_leftovers, run_dir)
            return failed
        finally:
            await self.lock.release()

    async def _run_logged(self, trigger: str) -> TrainingRun | None:
        try:
            return await self.run_once(trigger=trigger)
        except ImprovementBusyError as error:
            logger.info("%s", error)
        except asyncio.CancelledError:
            raise
        except Exception:  # the run is recorded as failed already; keep the server alive
            logger.exception("improvement run failed")
        return None

    async def run_once(self, *, trigger: str) -> TrainingRun:
        """One whole improvement run; returns its final record. The active policy is untouched on failure."""
        if not await self.lock.acquire():
            raise ImprovementBusyError("another improvement run holds the trainer lock; skipping this one")
        settings = self.settings
        try:
            imagination = self.imagination()
            imagined = imagined_per_run(settings, imagination)
            config = {
                "task": self.task.name,
                "algo": settings.improve_algo,
                "steps": settings.improve_steps,
                "value_steps": settings.improve_value_steps,
                "imagined": imagined,
                "imagined_pool": settings.improve_imagined_pool,
                "backend": imagination.backend,
                "backend_reason": imagination.reason,
                "real_ratio": settings.improve_real_ratio,
                "eval_episodes": settings.improve_eval_episodes,
                "margin": settings.improve_margin,
                "from": settings.improve_from,
                "base_model": settings.base_model,
            }
            run = await self.store.start_training_run(trigger=trigger, config=config)
            if imagined > 0:
                logger.log(
                    logging.WARNING if imagination.warning else logging.INFO,
                    "improvement run %s imagines %d dialogues with %s",
                    run.id,
                    imagined,
                    imagination.describe(),
                )
            run_dir = settings.data_dir / "runs" / f"run-{run.id}"
            candidate_dir = run_dir / "candidate"
            try:
                return await self._steps(run, run_dir, candidate_dir, imagination, imagined)
            except asyncio.CancelledError:
                await asyncio.shield(
                    self.store.update_training_run(run.id, status=RunStatus.CANCELLED, error="cancelled")
                )
                raise
            except Exception as error:
                message = redaction.redact(f"{type(error).__name__}: {error}")
                logger.warning("improvement run %s failed: %s", run.id, message)
                return await self.store.update_training_run(run.id, status=RunStatus.FAILED, error=message)
            finally:
                # Whatever the outcome: the input (real users' words) and any partial checkpoint go.
                await asyncio.shield(asyncio.to_thread(_remove_leftovers, run_dir))
        finally:
            await self.lock.release()

    async def _steps(
        self, run: TrainingRun, run_dir: Path, candidate_dir: Path, imagination: ImaginationChoice, imagined: int
    ) -> TrainingRun:
        deadline = time.monotonic() + self.settings.improve_time_limit_minutes * 60
        started = time.monotonic()
        # seconds per step, kept in the run's metrics ("imagine_s", …) so every replica's operator page shows them
        step_seconds: dict[str, float] = {}
        current: list[tuple[str, float]] = []

        def remaining() -> float:
            return max(1.0, deadline - time.monotonic())

        def step(name: str) -> None:
            now = time.monotonic()
            if current:
                step_seconds[current[0][0]] = now - current[0][1]
            current[:] = [(name, now)]
            self.on_step(name)

        step("imagine")
        if imagined > 0:
            await self._imagine(run, run_dir, imagination.backend, imagined, remaining())
            if imagination.also is not None:  # the LLM server's free-form dialogues, mixed in
                await self._imagine(run, run_dir, imagination.also, IMAGINED_PER_RUN[imagination.also], remaining())

        step("select")
        dialogues_path, run, real_ids = await self._select(run, run_dir)

        step("train")
        active = await self.store.active_policy_version()
        await self._train(run, dialogues_path, candidate_dir, active, run_dir, remaining())

        step("evaluate")
        from learning.checkpoint import verify_checkpoint  # import late: the server starts faster

        sha256 = await asyncio.to_thread(verify_checkpoint, candidate_dir)  # a corrupt candidate stops here
        results = await self._evaluate(run, candidate_dir, active, run_dir, remaining())

        step("gate")
        return await self.promote_or_reject(
            run,
            candidate_dir,
            sha256=sha256,
            candidate_success=results.candidate_success,
            active_success=results.active_success,
            paired=results.paired,
            duration_s=time.monotonic() - started,
            step_seconds=step_seconds,
            trained_on=real_ids,
        )

    async def _imagine(self, run: TrainingRun, run_dir: Path, backend: str, count: int, time_limit_s: float) -> None:
        """``count`` fresh imagined dialogues of the task from ``backend``; they land in the database as
        ``source="imagined"``."""
        # the spec's own file, so a task given by path reaches the child as that path
        command = _flags("imagine", task=self.task.reference, n=count, backend=backend, seed=run.id)
        await self._child("imagine", command, run_dir, time_limit_s)

    async def _select(self, run: TrainingRun, run_dir: Path) -> tuple[Path, TrainingRun, list[int]]:
        """The newest ``IMPROVE_IMAGINED_POOL`` imagined dialogues of the task plus real ones rewarded since the last
        run, as JSONL for the trainer; also the ids of the real ones, which the promotion checks against
        ``/forget``."""
        since = await self.store.last_successful_run_time()
        imagined = await self.store.dialogues_for_training(
            sources=[Source.IMAGINED], task=self.task.name, limit=self.settings.improve_imagined_pool, newest=True
        )
        real = await self.store.dialogues_for_training(sources=[Source.REAL], task=self.task.name, since=since)
        if not imagined and not real:
            raise StepFailedError("no training dialogues: imagination produced none and no real ones are rated")
        path = run_dir / RUN_INPUT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(d.to_dict(), ensure_ascii=False) + "\n" for d in [*imagined, *real]))
        # A /forget between the selection above and the write just now: take its user out of the file too.
        await purge_forgotten(self.store, self.settings.data_dir)
        run = await self.store.update_training_run(run.id, n_imagined=len(imagined), n_real=len(real))
        return path, run, [d.id for d in real if d.id is not None]

    async def _train(
        self,
        run: TrainingRun,
        dialogues: Path,
        candidate_dir: Path,
        active: PolicyVersion | None,
        run_dir: Path,
        time_limit_s: float,
    ) -> None:
        """Train a candidate checkpoint; mixing at the configured ratio happens in the trainer's sampler."""
        s = self.settings
        init_from = active.path if s.improve_from == "active" and active and Path(active.path).is_dir() else None

        def write() -> Path:  # off the event loop: it imports the trainer (torch) the first time
            config = train_config(
                s,
                algorithm=s.improve_algo,
                task=self.task.reference,
                seed=run.id or 0,
                steps=s.improve_steps,
                value_steps=s.improve_value_steps,
            )
            return write_job(TrainJob(config, str(dialogues), init_from), run_dir / TRAIN_JOB)

        job = await asyncio.to_thread(write)
        command = reverie_command("train", "--job", str(job), "--out", str(candidate_dir))
        await self._child("train", command, run_dir, time_limit_s)

    async def _evaluate(
        self, run: TrainingRun, candidate_dir: Path, active: PolicyVersion | None, run_dir: Path, time_limit_s: float
    ) -> GateInputs:
        """Success rates of candidate and active policy on the same simulated users, and their paired
        difference."""
        s = self.settings
        out = run_dir / "evaluation"
        job = EvalJob(
            task=self.task.reference,
            policies={CANDIDATE: str(candidate_dir), ACTIVE: active_source(active)},
            users="scripted" if world_available(self.task) else "llm",
            episodes=s.improve_eval_episodes,
            seed=run.id or 0,
            base_model=s.base_model,
        )
        command = reverie_command("eval", "--job", str(write_job(job, run_dir / EVAL_JOB)), "--out", str(out))
        await self._child("evaluate", command, run_dir, time_limit_s)
        return _gate_inputs(out / "report.json")

    async def promote_or_reject(
        self,
        run: TrainingRun,
        candidate_dir: Path,
        *,
        sha256: str,
        candidate_success: float,
        active_success: float,
        paired: PairedDifference | None = None,
        duration_s: float = 0.0,
        trained_on: list[int] | None = None,
        step_seconds: dict[str, float] | None = None,
    ) -> TrainingRun:
        """Register the candidate; promote and hot-swap it only if :func:`gate` says it is not worse.

        ``sha256``: the candidate's digest as verified before its evaluation (it must not have changed since);
        ``paired``: the candidate − active difference over the same personas (a significantly negative one is never
        promoted), recorded in the run's and the version's metrics.

        ``step_seconds``: how long each step took, kept in the run's metrics as ``<step>_s``.

        ``trained_on``: ids of the real conversations in its training set. If any of their users asked to be
        forgotten before the promotion, the candidate is discarded (checkpoint deleted, never served) and the
        run fails; the promotion itself is one transaction with that check (``Store.activate_policy_version``).
        """
        decision = gate(candidate_success, active_success, self.settings.improve_margin, paired)
        active = await self.store.active_policy_version()
        final_dir = self.settings.checkpoints_dir / f"v-run{run.id}"
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        candidate_dir.rename(final_dir)
        from learning.checkpoint import CheckpointError

        gate_metrics = paired.to_metrics() if paired is not None else {}
        try:
            version = await register_checkpoint(
                self.store,
                final_dir,
                metrics={
                    "success_rate": candidate_success,
                    "active_success_rate": active_success,
                    "run_id": run.id,
                    **gate_metrics,
                },
                parent_id=active.id if active else None,
                expected_sha256=sha256,
            )
        except CheckpointError:  # altered since its evaluation: never registered, never served
            shutil.rmtree(final_dir, ignore_errors=True)
            raise
        assert version.id is not None
        if decision.promote:
            policy = await self._load(str(final_dir), version.id)  # before the switch: a bad load changes nothing
            try:
                await self.store.activate_policy_version(version.id, trained_on=trained_on)
            except ForgottenDataError as error:
                _close(policy)
                await self.store.set_policy_status(version.id, PolicyStatus.REJECTED, metrics={"forgotten": True})
                shutil.rmtree(final_dir, ignore_errors=True)
                logger.warning("improvement run %s: %s", run.id, error)
                return await self.store.update_training_run(
                    run.id, status=RunStatus.FAILED, candidate_version_id=version.id, error=str(error)
                )
            except BaseException:
                _close(policy)
                raise
            self._serve(policy)
            status = RunStatus.SUCCEEDED
        else:
            await self.store.set_policy_status(version.id, PolicyStatus.REJECTED)
            status = RunStatus.REJECTED
        logger.info("improvement run %s: %s", run.id, decision.reason)
        await self._prune()
        metrics = {
            "candidate_success": candidate_success,
            "active_success": active_success,
            "decision": decision.reason,
            "duration_s": round(duration_s, 1),
            **{f"{name}_s": round(seconds, 1) for name, seconds in (step_seconds or {}).items()},
            **gate_metrics,
        }
        return await self.store.update_training_run(
            run.id, status=status, candidate_version_id=version.id, metrics=metrics
        )

    async def _swap_in(self, path: str | None, version_id: int | None) -> None:
        """Load a policy off the event loop and make it serve the next turns."""
        self._serve(await self._load(path, version_id))

    async def _load(self, path: str | None, version_id: int | None) -> Policy | None:
        """Load a policy for serving off the event loop (``None`` path: the base model); ``None`` without a holder."""
        if self.holder is None or self.load_policy is None:
            return None
        return await asyncio.to_thread(self.load_policy, path if path is not None else "base", version_id)

    def _serve(self, policy: Policy | None) -> None:
        if policy is not None and self.holder is not None:
            self.holder.swap(policy)

    async def _prune(self) -> None:
        """Delete checkpoints of all but the newest ``keep_versions`` versions, never the active one nor one of
        the next ``keep_versions`` rollback targets (rollback must find what it steps back to)."""
        versions = await self.store.list_policy_versions(limit=1000)
        keep = {v.id for v in versions[: self.settings.keep_versions]}
        keep |= {v.id for v in await self.store.rollback_stack(limit=self.settings.keep_versions)}
        for version in versions:
            if version.id in keep or version.status == PolicyStatus.ACTIVE:
                continue
            path = Path(version.path)
            if path.is_dir() and self.settings.checkpoints_dir.resolve() in path.resolve().parents:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("pruned checkpoint of version %s", version.id)


async def _sync_periodically(loop: ImprovementLoop, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await loop.sync_active()
        except Exception:  # a database hiccup must not end the watcher
            logger.exception("checking the active policy version failed")


def make_improvement_hook(
    sync_interval_s: float = 60.0,
) -> Callable[[Runtime], contextlib.AbstractAsyncContextManager[ImprovementLoop]]:
    """The server's improvement hook (see ``bot.server.ImproverHook``), with a configurable sync interval."""

    @asynccontextmanager
    async def hook(runtime: Runtime) -> AsyncIterator[ImprovementLoop]:
        from bot.scheduler import JOB_ID, start_scheduler, stop_scheduler

        settings = runtime.settings
        loop = ImprovementLoop(
            store=runtime.store,
            settings=settings,
            task=runtime.task,
            holder=runtime.policies,
            load_policy=runtime.load_policy,
            serving_quiet=runtime.service.quiet_for,
        )
        if recovered := await loop.recover_after_crash():
            logger.warning("%d improvement run(s) left unfinished by a previous process marked failed", recovered)
        scheduler = None
        if settings.improve_enabled:
            scheduler = start_scheduler(settings.resolved_database_url, settings.improve_cron, loop.run_scheduled)
            loop.next_run_time = lambda: (job := scheduler.get_job(JOB_ID)) and job.next_run_time
            never_trained = (
                await runtime.store.active_policy_version() is None
                and await runtime.store.last_successful_run_time() is None
            )
            if never_trained and settings.improve_on_first_start:
                logger.info("no trained policy yet: training a first one in the background")
                await loop.request_run(trigger="first-start", requested_by="server")
        watcher = asyncio.create_task(_sync_periodically(loop, sync_interval_s), name="policy-sync")
        try:
            yield loop
        finally:
            watcher.cancel()
            if scheduler is not None:
                stop_scheduler(scheduler)
            await loop.shutdown()

    return hook


#: The hook ``reverie serve`` uses.
improvement_hook = make_improvement_hook()


async def _step(
    name: str,
    command: list[str],
    *,
    log_path: Path,
    time_limit_s: float,
    env: dict[str, str],
    lend_when: Callable[[], bool] | None = None,
) -> None:
    """:func:`run_step`, with secrets masked in its log and in the error it raises (a child can print a
    traceback before its own logging is set up, and the error's log tail ends up in the run record)."""
    try:
        await run_step(name, command, log_path=log_path, time_limit_s=time_limit_s, env=env, lend_when=lend_when)
    except StepFailedError as error:
        raise StepFailedError(redaction.redact(str(error))) from None
    finally:
        await asyncio.shield(asyncio.to_thread(redaction.redact_file, log_path))


def _remove_leftovers(run_dir: Path) -> None:
    """Delete a finished run's inputs (users' words, the job files) and partial checkpoints: the candidate if it was
    not promoted, the trainer's resume state (``.candidate.resume``), staging directories (``.candidate.tmp-*``) and
    critic-awr's imitation warm-up (``.candidate.bc`` and its ``..candidate.bc.resume``)."""
    for name in (RUN_INPUT, TRAIN_JOB, EVAL_JOB):
        (run_dir / name).unlink(missing_ok=True)
    for leftover in [run_dir / "candidate", *run_dir.glob(".candidate*"), *run_dir.glob("..candidate*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.exists():
            leftover.unlink(missing_ok=True)


def _close(policy: Policy | None) -> None:
    """Close a policy that was loaded but will not serve (it holds a model in memory)."""
    if policy is not None:
        try:
            policy.close()
        except Exception:
            logger.exception("closing an unused policy failed")


def _flags(command: str, **options: object) -> list[str]:
    """``reverie COMMAND --opt value ...``; ``None`` options are left out."""
    args = [command]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return reverie_command(*args)


def _metrics_summary(metrics: dict[str, Any]) -> str:
    if "success_rate" in metrics:
        return f"success {float(metrics['success_rate']):.1%} on simulated users"
    return "no evaluation yet"


def active_source(version: PolicyVersion | None) -> str:
    """What to load at start-up: the active checkpoint if it is still on disk, else the base model."""
    if version is not None and Path(version.path).is_dir():
        return version.path
    return "base"
