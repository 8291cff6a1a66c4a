"""The retraining scheduler: APScheduler jobs in a persistent job store, one run at a time.

Three jobs, from ``config.scheduler``: ``retrain`` on a cron schedule (``services.retrain``),
``drift`` every ``drift_interval`` (``services.drift_check``), which starts a retrain when it finds
drift, and ``ingest`` every ``incoming_interval``, the data watch: files landed in ``incoming``
become a new dataset version, and once ``min_new_documents`` new documents have arrived since the
champion's data it starts a retrain. The jobs live in APScheduler's SQLAlchemy job store, so a
restart keeps their schedule: a run missed while the scheduler was down still happens (once,
``coalesce``) if it is less than ``misfire_grace_s`` late. A job is rewritten only when its
trigger changed in the config.

Retrains are the costly job, so they run in the off-peak ``window``: a scheduled, drift or
new-data retrain due outside it is recorded as deferred and queued (in the job store) for the
window's start, unless the drift that asked for it is urgent (``urgent_drift_score``); a manual
run never waits. A run that fails is tried again after ``retry_backoff_s`` (doubling), up to
``max_attempts``; bad state or config (a ``UserInputError``) is not retried, since it would fail
the same way.

One run at a time: a single executor thread runs every job, and follow-up retrains run in that
same thread, so a retrain never overlaps another one or a drift check. A second scheduler on the
same job store would run every job twice; an exclusive lock refuses it (``services.state_lock``: an
advisory lock in the store's database where that is PostgreSQL, a lock file beside a SQLite store).

Every attempt lands in the ``job_runs`` table next to the job store (job, reason with the attempt,
start, end, outcome, detail), which ``services.exporter`` turns into ``genloop_scheduler_*`` series
and ``genloop scheduler status`` prints; the stages it went through (ingest, train, gate, …, with
the MLflow run and the reports each produced) land in ``job_stages``. A run asked for with
``run_now`` gets its row at once, as ``queued``, so whoever asked has its id before it starts.
Outcomes are few and fixed: a retrain is promoted,
rejected, skipped (too little new data) or deferred (outside the window); a drift check is drift,
no drift or insufficient data; an ingest is ingested or no new data; anything that raises, or was
cut off by the process dying (or by ``stop``'s grace period running out), is failed; a due run
that could not start is skipped (still busy) or missed (too late).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import BaseModel, Field
from sqlalchemy import (
    Column,
    CursorResult,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
    update,
)

from genloop.monitoring.metrics import JobState
from genloop.services.config import GenloopConfig
from genloop.services.schedule import cron_trigger, window_wait
from genloop.services.state_lock import LockHeld, StateLock
from genloop.training.dataset_store import list_versions
from genloop.training.errors import UserInputError

logger = logging.getLogger(__name__)

JOBS_TABLE = "apscheduler_jobs"
_ONE_OFF = "-now-"  # id infix of run_now's one-off jobs: "<job>-now-<ns>"
DEFERRED = f"retrain{_ONE_OFF}deferred"  # the retrain waiting for the window (at most one)
_WAITS_FOR_WINDOW = ("schedule", "drift", "new data")  # reasons whose retrain keeps to the window
metadata = MetaData()
job_runs = Table(
    "job_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", String(40), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("outcome", String(40), nullable=False),
    Column("detail", String(2000), nullable=False, default=""),
)
job_stages = Table(
    "job_stages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, nullable=False, index=True),
    Column("stage", String(40), nullable=False),
    Column("at", Float, nullable=False),
    Column("detail", String(2000), nullable=False, default=""),
    Column("mlflow_run_id", String(64)),
    Column("report", String(300)),
)
ACTIVE = ("queued", "running")  # outcomes of a run that has not ended


class JobRun(BaseModel):
    id: int
    job: str
    reason: str
    started_at: float
    finished_at: float | None
    outcome: str
    detail: str


class JobStage(BaseModel):
    stage: str
    at: float
    detail: str
    mlflow_run_id: str | None
    report: str | None = Field(description="Path of a report the stage wrote, relative to the reports folder.")


# What a job reports as it moves on: stage name, then optionally detail, mlflow_run_id, report.
StageReporter = Callable[..., None]


def _new_id(result: CursorResult) -> int:
    """The primary key an INSERT just gave its row."""
    key = result.inserted_primary_key
    assert key is not None, "an INSERT of one row"
    return int(key[0])


class JobHistory:
    """The ``job_runs`` table and the job store's next run times, readable from any process."""

    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
        metadata.create_all(self.engine)
        self._jobs = SQLAlchemyJobStore(engine=self.engine, tablename=JOBS_TABLE).jobs_t

    def queued(self, job: str, reason: str) -> int:
        with self.engine.begin() as connection:
            return _new_id(connection.execute(insert(job_runs).values(
                job=job, reason=reason, started_at=time.time(), outcome="queued")))

    def started(self, job: str, reason: str, run_id: int | None = None) -> int:
        """A new running row, or the queued row ``run_id`` now running."""
        with self.engine.begin() as connection:
            if run_id is not None and connection.execute(
                    update(job_runs).where((job_runs.c.id == run_id) & (job_runs.c.outcome == "queued"))
                    .values(started_at=time.time(), outcome="running")).rowcount:
                return run_id
            return _new_id(connection.execute(insert(job_runs).values(
                job=job, reason=reason, started_at=time.time(), outcome="running")))

    def finished(self, run_id: int, outcome: str, detail: str) -> bool:
        """Close a run that has not ended; False when something else (``stop``'s grace period) closed it."""
        with self.engine.begin() as connection:
            return bool(connection.execute(
                update(job_runs).where((job_runs.c.id == run_id) & job_runs.c.outcome.in_(ACTIVE)).values(
                    finished_at=time.time(), outcome=outcome, detail=detail[:2000])).rowcount)

    def stage(self, run_id: int, stage: str, detail: str = "", mlflow_run_id: str | None = None,
              report: str | None = None) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(job_stages).values(run_id=run_id, stage=stage, at=time.time(),
                                                         detail=detail[:2000], mlflow_run_id=mlflow_run_id,
                                                         report=report))

    def interrupted(self) -> int:
        """Close runs a dead process left open or queued (only the store's lock holder may call this)."""
        with self.engine.begin() as connection:
            return connection.execute(update(job_runs).where(job_runs.c.outcome.in_(ACTIVE)).values(
                finished_at=time.time(), outcome="failed",
                detail="interrupted: the process running it stopped")).rowcount

    def get(self, run_id: int) -> tuple[JobRun, list[JobStage]] | None:
        """One run and its stages, oldest first."""
        with self.engine.connect() as connection:
            row = connection.execute(select(job_runs).where(job_runs.c.id == run_id)).mappings().first()
            stages = connection.execute(select(job_stages).where(job_stages.c.run_id == run_id)
                                        .order_by(job_stages.c.id)).mappings().all()
        return (JobRun(**row), [JobStage(**stage) for stage in stages]) if row is not None else None

    def active(self, job: str) -> JobRun | None:
        """The queued or running run of ``job``, if any."""
        with self.engine.connect() as connection:
            row = connection.execute(select(job_runs).where((job_runs.c.job == job) & job_runs.c.outcome.in_(ACTIVE))
                                     .order_by(job_runs.c.id.desc())).mappings().first()
        return JobRun(**row) if row is not None else None

    def recent(self, limit: int = 20) -> list[JobRun]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(job_runs).order_by(job_runs.c.id.desc()).limit(limit)).mappings().all()
        return [JobRun(**row) for row in rows]

    def summary(self) -> list[JobState]:
        """Per job: finished runs by outcome, when it last started, and when the job store runs it next."""
        with self.engine.connect() as connection:
            counts = connection.execute(
                select(job_runs.c.job, job_runs.c.outcome, func.count(), func.max(job_runs.c.started_at))
                .group_by(job_runs.c.job, job_runs.c.outcome)).all()
            upcoming: dict[str, float | None] = dict(connection.execute(
                select(self._jobs.c.id, self._jobs.c.next_run_time).where(~self._jobs.c.id.contains(_ONE_OFF))
            ).all()) if self._has_job_table(connection) else {}
        jobs: dict[str, JobState] = {}
        for job, outcome, count, last in counts:
            summary = jobs.setdefault(job, JobState(job=job))
            if outcome not in ACTIVE:
                summary.runs[outcome] = count
            summary.last_run = max(summary.last_run or 0.0, last)
        for job, next_run in upcoming.items():
            jobs.setdefault(job, JobState(job=job)).next_run = next_run
        return sorted(jobs.values(), key=lambda s: s.job)

    def _has_job_table(self, connection) -> bool:
        return self.engine.dialect.has_table(connection, JOBS_TABLE)


# APScheduler persists a job as a reference to an importable function plus its arguments, so the
# jobs call this module-level entry point, which finds the one running scheduler of this process.
_running: GenloopScheduler | None = None


def run_job(job: str, reason: str = "schedule", run_id: int | None = None) -> None:
    if _running is None:
        raise RuntimeError("no genloop scheduler runs in this process")
    _running.run(job, reason, show_progress=_running.show_progress, run_id=run_id)


class GenloopScheduler:
    """The configured jobs on a background APScheduler; ``start``/``stop``, or ``run`` one job now."""

    JOBS = ("retrain", "drift", "ingest")

    def __init__(self, config: GenloopConfig, show_progress: bool = False):
        """``show_progress``: jobs draw training's progress bar (a scheduler with a console of its own)."""
        self.config = config
        self.show_progress = show_progress
        self.history = JobHistory(config.scheduler_db)
        self._store_lock: StateLock | None = None
        self.scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=self.history.engine, tablename=JOBS_TABLE)},
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": config.scheduler.misfire_grace_s},
            timezone=UTC,
        )
        self.scheduler.add_listener(self._not_run, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self._run_lock = threading.Lock()
        self._stopping = threading.Event()  # cuts a retry's backoff short
        self._drifted_share = 0.0  # of the latest drift check, for urgency
        self._new_documents = 0  # unseen by the champion, as of the latest ingest, for its retrain
        self._current: dict = {}  # the attempt running now: run_id, job, stage, mlflow_run_id
        self._one_offs: dict[str, int] = {}  # run_now's job id → its queued row

    def triggers(self) -> dict[str, BaseTrigger]:
        settings = self.config.scheduler
        wanted: dict[str, BaseTrigger] = {}
        if settings.retrain_cron:
            wanted["retrain"] = cron_trigger(settings.retrain_cron)
        if settings.drift_interval:
            wanted["drift"] = IntervalTrigger(seconds=settings.drift_interval.total_seconds(), timezone=UTC)
        if settings.incoming is not None and settings.incoming_interval:
            wanted["ingest"] = IntervalTrigger(seconds=settings.incoming_interval.total_seconds(), timezone=UTC)
        return wanted

    def start(self) -> None:
        global _running
        if _running is not None:
            raise UserInputError("a genloop scheduler already runs in this process")
        self._take_store_lock()
        try:
            self.scheduler.start(paused=True)  # jobs are reconciled before anything may fire
            self._reconcile()
        except BaseException:
            self.stop()
            raise
        _running = self
        self.scheduler.resume()

    def _reconcile(self) -> None:
        """Make the stored jobs the configured ones; an unchanged job keeps its next run time, so a run
        missed while the scheduler was down is caught up."""
        wanted = self.triggers()
        grace = self.config.scheduler.misfire_grace_s
        for job in self.scheduler.get_jobs():
            if job.id not in wanted and job.id != DEFERRED:  # unconfigured, or a run_now that never ran
                logger.info("job %s is no longer configured: removed", job.id)
                job.remove()
        for job_id, trigger in wanted.items():
            existing = self.scheduler.get_job(job_id)
            if existing is not None and str(existing.trigger) == str(trigger):
                if existing.misfire_grace_time != grace:
                    existing.modify(misfire_grace_time=grace)
                continue
            self.scheduler.add_job(run_job, trigger, id=job_id, name=job_id, args=[job_id], replace_existing=True)
            logger.info("job %s scheduled: %s", job_id, trigger)

    def stop(self, grace_s: float | None = None) -> dict | None:
        """Stop firing jobs and wait for a running one to finish; None when nothing was left running.

        With ``grace_s``, wait that long at most: a run still going then is recorded as failed
        (interrupted, naming its stage) and its MLflow run as KILLED, and its attempt is returned
        (run_id, job, stage, mlflow_run_id). Its thread is left to die with the process: a training
        cannot be cut off halfway from here, and the checkpoints it wrote stay in Ray's storage."""
        global _running
        self._stopping.set()
        left = None
        if self.scheduler.running:
            self.scheduler.pause()  # no new submissions while the executor shuts down
            if grace_s is None:
                self.scheduler.shutdown(wait=True)
            else:
                self.scheduler.shutdown(wait=False)
                if not self._run_lock.acquire(timeout=grace_s):
                    left = self._abandon(grace_s)
                else:
                    self._run_lock.release()
        if _running is self:
            _running = None
        self._release_store_lock()
        return left

    def pause(self) -> None:
        """Fire no new job (``stop`` follows); a running one goes on."""
        if self.scheduler.running:
            self.scheduler.pause()

    def running_job(self) -> dict | None:
        """The attempt running now (run_id, job, stage, mlflow_run_id), or None."""
        return dict(self._current) or None

    def _abandon(self, grace_s: float) -> dict:
        current = dict(self._current)
        if "run_id" not in current:  # between two attempts: nothing recorded is running
            return current
        stage = current.get("stage", "start")
        self.history.finished(current["run_id"], "failed", f"interrupted: genloop stopped during its {stage} "
                              f"stage and it did not end within the {grace_s:g} s grace period")
        if run := current.get("mlflow_run_id"):
            from genloop.services.registry import Registry

            client = Registry(self.config).client
            client.set_tag(run, "genloop.failure", f"genloop stopped during the {stage} stage")
            client.set_terminated(run, "KILLED")
        logger.warning("job run %s (%s) interrupted during %s", current["run_id"], current.get("job"), stage)
        return current

    def run_now(self, job: str, reason: str = "manual") -> int:
        """Queue ``job`` on the scheduler's executor, after whatever runs now (one at a time); the id
        of its row in the job history, which says ``queued`` until it starts."""
        if job not in self.JOBS:
            raise UserInputError(f"unknown job {job!r}: {' or '.join(self.JOBS)}")
        run_id = self.history.queued(job, reason)
        job_id = f"{job}{_ONE_OFF}{time.time_ns()}"
        self._one_offs[job_id] = run_id
        self.scheduler.add_job(run_job, args=[job, reason, run_id], id=job_id, name=job)
        return run_id

    def run(self, job: str, reason: str, show_progress: bool = False, urgent: bool = False,
            run_id: int | None = None) -> str:
        """Run ``job`` in this thread, retried on failure, and record every attempt; returns the last
        outcome. Never raises for a failed run.

        ``show_progress`` draws training's progress bar (for a person at a terminal, not the scheduler);
        ``urgent`` lets a retrain run outside the window; ``run_id`` is the queued row the first
        attempt takes over."""
        if run_id is not None:
            self._one_offs = {key: value for key, value in self._one_offs.items() if value != run_id}
        if job == "retrain" and not urgent and reason in _WAITS_FOR_WINDOW:
            opens = window_wait(self.config.scheduler.window, datetime.now(UTC))
            if opens is not None:
                return self._defer(reason, opens)
        attempts = self.config.scheduler.max_attempts
        for attempt in range(1, attempts + 1):
            label = reason if attempt == 1 else f"{reason} (attempt {attempt}/{attempts})"
            outcome, retry = self._attempt(job, label, show_progress, run_id if attempt == 1 else None)
            if not retry or attempt == attempts:
                break
            backoff = self.config.scheduler.retry_backoff_s * 2 ** (attempt - 1)
            logger.warning("job %s: attempt %d of %d failed; next in %g s", job, attempt, attempts, backoff)
            if self._stopping.wait(backoff):
                break
        if outcome == "drift" and self.config.scheduler.retrain_on_drift:
            limit = self.config.scheduler.urgent_drift_score
            self.run("retrain", "drift", show_progress,
                     urgent=limit is not None and self._drifted_share >= limit)
        if outcome == "ingested" and self._new_documents >= self.config.scheduler.min_new_documents:
            self.run("retrain", "new data", show_progress)
        return outcome

    def _attempt(self, job: str, reason: str, show_progress: bool, queued: int | None) -> tuple[str, bool]:
        """One recorded attempt: its outcome, and whether a failure is worth another attempt."""
        retry = False
        with self._run_lock:
            run_id = self.history.started(job, reason, queued)
            self._current = {"run_id": run_id, "job": job}

            def stage(name: str, detail: str = "", mlflow_run_id: str | None = None, report: str | None = None):
                self._current.update(stage=name, **({"mlflow_run_id": mlflow_run_id} if mlflow_run_id else {}))
                self.history.stage(run_id, name, detail, mlflow_run_id, report)

            try:
                outcome, detail = {"drift": self._drift, "ingest": self._ingest}.get(
                    job, lambda _stage: self._retrain(reason, show_progress, _stage))(stage)
            except UserInputError as exc:  # the state or config is not ready (no champion, no data): no bug
                logger.warning("job %s failed: %s", job, exc)
                outcome, detail = "failed", str(exc)
            except Exception as exc:
                logger.exception("job %s failed", job)
                outcome, detail, retry = "failed", f"{type(exc).__name__}: {exc}", True
            self._current = {}
            if not self.history.finished(run_id, outcome, detail):
                return "failed", False  # interrupted by ``stop``: no retry, no follow-up
            logger.info("job %s (%s): %s — %s", job, reason, outcome, detail)
        return outcome, retry

    def _defer(self, reason: str, opens: datetime) -> str:
        """Record a retrain that waits for the window and queue it for the window's start."""
        detail = f"outside the window {self.config.scheduler.window} (UTC): waits until {opens.isoformat()}"
        if self.scheduler.running:
            self.scheduler.add_job(run_job, "date", run_date=opens, args=["retrain", reason], id=DEFERRED,
                                   name="retrain", replace_existing=True)
        else:
            detail += " (no scheduler runs here to start it then)"
        run_id = self.history.started("retrain", reason)
        self.history.finished(run_id, "deferred", detail)
        logger.info("job retrain (%s): deferred — %s", reason, detail)
        return "deferred"

    def _retrain(self, reason: str, show_progress: bool, stage: StageReporter) -> tuple[str, str]:
        from genloop.services.retrain import retrain  # heavy (torch, Ray): only where a job really runs

        result = retrain(self.config, reason, show_progress, stage=stage)
        return result.outcome, result.detail

    def _drift(self, stage: StageReporter) -> tuple[str, str]:
        from genloop.services.drift_check import run_drift_check

        stage("drift")
        result = run_drift_check(self.config)
        stage(result.verdict, report=f"drift/{result.id}.html")
        self._drifted_share = result.drifted_share
        drifted = ", ".join(result.drifted_features) or "none"
        return result.verdict, (f"{result.current_samples} prompts vs {result.reference_samples} reference; "
                                f"drifted: {drifted} ({result.drifted_share:.0%}); report {result.id}")

    def _ingest(self, stage: StageReporter) -> tuple[str, str]:
        from genloop.services.retrain import ingest_new_data, unseen

        stage("ingest")
        settings = self.config.scheduler
        before = len(list_versions(self.config.datasets_dir, settings.dataset))
        ingest_new_data(self.config, sources=False)
        if len(list_versions(self.config.datasets_dir, settings.dataset)) == before:
            return "no new data", f"no new settled file in {settings.incoming}"
        fresh, _, count = unseen(self.config)
        self._new_documents = count
        return "ingested", (f"{fresh.spec} from {settings.incoming}: {count} documents the champion has not seen "
                            f"(a retrain needs {self.config.scheduler.min_new_documents})")

    def _not_run(self, event: JobEvent) -> None:
        """A due run that did not happen is recorded too: still busy (skipped) or too late (missed)."""
        job, _, one_off = event.job_id.partition(_ONE_OFF)
        run_id = self.history.started(job, "manual" if one_off else "schedule", self._one_offs.pop(event.job_id, None))
        if event.code == EVENT_JOB_MISSED:
            self.history.finished(run_id, "missed", f"more than {self.config.scheduler.misfire_grace_s} s late")
        else:
            self.history.finished(run_id, "skipped", "the previous run of this job was still going")

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the job store's lock without scheduling: for a one-off run outside ``start``."""
        self._take_store_lock()
        try:
            yield
        finally:
            self._release_store_lock()

    def _take_store_lock(self) -> None:
        """One scheduler per job store (see the module's docstring)."""
        url = self.config.scheduler_db
        file = (Path(url.removeprefix("sqlite:///") + ".lock") if url.startswith("sqlite:///")
                else self.config.home / "scheduler.lock")
        try:
            self._store_lock = StateLock(url, "scheduler", file)
        except LockHeld as held:
            raise UserInputError(f"another genloop scheduler runs on this job store ({held})") from None
        if closed := self.history.interrupted():
            logger.warning("%d job runs were left open by a stopped scheduler: recorded as failed", closed)

    def _release_store_lock(self) -> None:
        if self._store_lock is not None:
            self._store_lock.close()
            self._store_lock = None


