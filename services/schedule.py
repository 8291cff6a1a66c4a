"""When the scheduler's jobs run: its config section, crontab expressions, the off-peak window.

The scheduler (``services.scheduler``) owns these; they sit in a module of their own because the
config validates a crontab expression and a window when it loads, and the scheduler module imports
the config (and APScheduler's job store) in turn.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import Field, field_validator

from genloop.training.config import LearningRateRange, Section


class RetrainSearchConfig(Section):
    """The search a warm-start retrain runs on Ray Tune (``services.search``), all within ``retrain_budget``."""

    # 1 by default: at the 20 % budget, trials that split it learn the new domain less than one run
    # given all of it, on every shift measured (-14.3 % against -21.0 % bits/byte on the demo's,
    # benchmarks/results/retrain_search.json), and a run with part of the budget has too little of the
    # rate's decay to recover the old domain (results/retrain_horizon_licences.json): the search is
    # for budgets with room to spare.
    trials: int = Field(
        1, ge=1, le=32, description="Trials at most; each is one Ray Train run. 1 = a single run with "
        "scheduler.replay_fraction and train.learning_rate, no search.",
    )
    replay_fractions: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75], min_length=1,
        description="Replay shares the trials after the first take in turn (the first takes scheduler.replay_fraction; "
        "later trials skip that share while there are others).",
    )
    learning_rate_range: LearningRateRange = Field(
        (0.25, 1.0), description="Every trial after the first samples its peak learning rate log-uniformly between "
        "these multiples of train.learning_rate (the first takes it as it is).",
    )
    trial_budget: float = Field(
        0.5, gt=0, le=1, description="Most of the retrain's budget one trial may spend; what ASHA saves by stopping "
        "trials early goes to the next.",
    )
    reduction_factor: float = Field(
        2, gt=1, description="ASHA's reduction factor: at each rung a trial goes on only when its gate score is "
        "in the best 1/this of the trials' scores there.",
    )
    concurrent_trials: int = Field(
        1, ge=1, description="Trials that may run side by side; raise it on a cluster with room for several "
        "training worker groups.",
    )

    @field_validator("replay_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 <= fraction < 1 for fraction in value):
            raise ValueError("every replay fraction must be in [0, 1)")
        return value


class SchedulerConfig(Section):
    retrain_cron: str | None = Field(
        "0 3 * * *", description="When the retrain job runs (crontab, 5 fields, UTC); null = never on a schedule."
    )
    drift_interval: timedelta | None = Field(
        timedelta(hours=1), description="How often the drift check runs (e.g. PT1H); null = never."
    )
    retrain_on_drift: bool = Field(True, description="A drift check that finds drift starts the retrain job.")
    sources: list[str] = Field(
        default_factory=list,
        description="Data the retrain job ingests first (as `genloop data ingest`); empty = train on the newest "
        "version of `dataset` as it is.",
    )
    dataset: str = Field("live", description="Dataset the retrain job ingests into and trains on.")
    misfire_grace_s: int = Field(
        3600, ge=1, description="A run missed while the scheduler was down still happens if it is this late at most."
    )
    job_store_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store and job history; default sqlite:///$GENLOOP_HOME/scheduler.db."
    )
    # 0.5, chosen on two shifts (Python's source, licence texts) and confirmed on a third kept out of the
    # choice (manual pages): promoted on all three, where 0.25 forgot 2.3 % of the old domain on the
    # licences and was refused (benchmarks/results/retrain_search.json).
    replay_fraction: float = Field(
        0.5, ge=0, lt=1, description="Share of a warm-start retrain's training text (in characters) replayed "
        "from the data the champion and its ancestors trained on, so it does not forget it; 0 = the new "
        "documents alone.",
    )
    selection_margin: float = Field(
        0.01, ge=0, lt=1, description="Room a warm-start retrain's checkpoint must leave under every gate rule, on "
        "the retrain's own held-out texts, to be chosen for what it learned; the gate scores other texts, which "
        "read the same model up to half a point apart (services.selection).",
    )
    retrain_budget: float = Field(
        0.2, gt=0, description="Most compute a warm-start retrain may spend: up to 1, a share of its lineage's "
        "from-scratch training compute; above 1, optimizer steps. Early stopping may end it sooner.",
    )
    search: RetrainSearchConfig = Field(
        default_factory=RetrainSearchConfig, description="The warm-start retrain's search on Ray Tune."
    )
    # 2, chosen on the licence shift (full-budget runs at replay 0.5: 1x -24.8 % new / -0.1 % old,
    # 2x -30.9 % / +0.1 %, 3x -32.3 % / +0.8 %; benchmarks/results/retrain_horizon_licences.json),
    # confirmed on Python's source and manual pages (retrain_search.json, retrain_horizon_manpages.json):
    # the budget is too short for pre-training's peak to learn a new domain, and the old one recovers
    # as the rate decays.
    retrain_learning_rate_scale: float = Field(
        2.0, gt=0, description="Peak learning rate of a warm-start retrain, as a multiple of train.learning_rate.",
    )
    retrain_micro_batch_size: int = Field(
        4, ge=1, description="Sequences per worker per step of a warm start. Smaller than pre-training's: at a "
        "fixed compute budget, more and smaller steps learn a new domain faster.",
    )
    incoming: Path | None = Field(
        None, description="Folder watched for new data files (txt/jsonl/json/csv/parquet); each is ingested once, "
        "by content hash, into `dataset`; null = no data watch.",
    )
    incoming_interval: timedelta | None = Field(
        timedelta(minutes=5), description="How often the ingest job looks into `incoming` (e.g. PT5M); null = never."
    )
    incoming_settle_s: float = Field(
        30, ge=0, description="A file in `incoming` is read only once it has not been modified for this long, so a "
        "file still being written is never read halfway (write elsewhere and rename to be safe at any size).",
    )
    min_new_documents: int = Field(
        100, ge=1, description="New documents, since the champion's data, that a retrain needs; the ingest job "
        "starts one once this many have arrived.",
    )
    feedback_min_rating: Literal[0, 1] | None = Field(
        None, description="Completions rated at least this (1: positive only, 0: neutral too) join the retrain's "
        "new data; null = feedback is not training data.",
    )
    window: str | None = Field(
        None, description="Off-peak window 'HH:MM-HH:MM' (UTC, may wrap midnight) for scheduled, drift and "
        "new-data retrains; one due outside it waits for its start. null = any time; manual runs never wait.",
    )
    urgent_drift_score: float | None = Field(
        0.9, gt=0, le=1, description="Drifted share of prompt features at or above which a drift-triggered "
        "retrain runs at once, outside the window; null = never urgent.",
    )
    max_attempts: int = Field(3, ge=1, description="Attempts of a job run that fails (not of one refused by the gate).")
    retry_backoff_s: float = Field(
        60, ge=0, description="Wait before the second attempt of a failed run; doubled before each further one."
    )

    @field_validator("window")
    @classmethod
    def _valid_window(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value)
        return value

    @field_validator("retrain_budget")
    @classmethod
    def _whole_steps(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("above 1 the budget is a number of optimizer steps: give a whole number")
        return value

    def budget_steps(self, initial_tokens: int, tokens_per_step: int) -> int:
        """Optimizer steps ``retrain_budget`` allows, given the lineage's from-scratch training tokens."""
        if self.retrain_budget > 1:
            return int(self.retrain_budget)
        return max(1, int(self.retrain_budget * initial_tokens / tokens_per_step))

    @field_validator("retrain_cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            cron_trigger(value)  # APScheduler's ValueError names the bad field
        return value


def parse_window(text: str) -> tuple[time, time]:
    """'HH:MM-HH:MM' → (start, end) times of day; the window wraps midnight when end ≤ start."""
    try:
        start, end = (time.fromisoformat(part.strip()) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"window {text!r} is not 'HH:MM-HH:MM' (UTC)") from None
    if start == end:
        raise ValueError(f"window {text!r} is empty")
    return start, end


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_weekdays(field: str) -> set[int]:
    """The days (Sunday = 0) a crontab weekday field names: lists of *, N, N-M, each with /STEP; names too."""
    def day(text: str) -> int:
        value = _WEEKDAYS.index(text[:3].lower()) if text[:3].lower() in _WEEKDAYS else int(text)
        if not 0 <= value <= 7:
            raise ValueError(f"weekday {text} is not 0-7 or a day name")
        return value

    days: set[int] = set()
    for item in field.split(","):
        span, _, step = item.partition("/")
        try:
            low, high = (0, 6) if span == "*" else (day(span.split("-")[0]), day(span.split("-")[-1]))
            every = int(step) if step else 1
        except ValueError as exc:
            raise ValueError(f"weekday field {field!r}: {exc}") from None
        if every < 1 or low > high:
            raise ValueError(f"weekday field {field!r}: {item!r} is not a valid range")
        days.update(d % 7 for d in range(low, high + 1, every))
    return days


def cron_trigger(expression: str) -> CronTrigger:
    """An APScheduler CronTrigger (UTC) that reads ``expression`` as crontab(5) does.

    APScheduler 3 numbers weekdays from Monday = 0 and crontab from Sunday = 0 (or 7), so "1"
    would fire on Tuesdays; the weekday field is expanded here, crontab's way, into day names.
    Crontab fires when the day of month *or* the weekday matches if both are given, APScheduler
    only when both do: such an expression is refused rather than run on other days.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"crontab needs 5 fields (minute hour day month weekday), got {len(fields)}")
    if fields[2] != "*" and fields[4] != "*":
        raise ValueError("give the day of month or the weekday, not both (crontab would fire on either)")
    if fields[4] != "*":
        fields[4] = ",".join(_WEEKDAYS[day] for day in sorted(_crontab_weekdays(fields[4])))
    return CronTrigger.from_crontab(" ".join(fields), timezone=UTC)


def window_wait(window: str | None, now: datetime) -> datetime | None:
    """When the off-peak ``window`` next opens, or None when ``now`` is inside it (or there is none)."""
    if window is None:
        return None
    start, end = parse_window(window)
    moment = now.timetz().replace(tzinfo=None)
    inside = start <= moment < end if start < end else (moment >= start or moment < end)
    if inside:
        return None
    opens = now.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
    return opens if opens > now else opens + timedelta(days=1)
