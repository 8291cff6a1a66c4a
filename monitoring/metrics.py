"""Every Prometheus instrument genloop exports, in one place (DESIGN.md: prefix ``genloop_``,
unit suffixes, bounded labels — a model version, a route, a status; never a request id or text).

Latency buckets span what LLM serving sees: a few milliseconds per token up to minutes for a
long completion on CPU, so p50/p95/p99 stay resolvable at both ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
# 1-2-5 steps, as vLLM's token-count histograms, up to contexts far beyond any genloop serves today.
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

# finished_reason tells how a request ended (vLLM's request_success_total has the label): "stop" or
# "length" for an answered generation ("length" when any choice was cut at its token budget: truncation
# is what an operator looks for), "abort" when the caller left first, "error" for a generation refused
# or failed, "none" for routes that generate nothing. A fixed set, whatever callers send.
REQUESTS = Counter(
    "genloop_requests_total", "API requests answered, each once whatever its prompts and choices.",
    ["route", "status", "model_version", "finished_reason"],
)
REQUEST_LATENCY = Histogram(
    "genloop_request_latency_seconds", "Arrival to last byte, of requests whose answer began.",
    ["route", "model_version"], buckets=LATENCY_BUCKETS,
)
REQUEST_PROMPT_TOKENS = Histogram(
    "genloop_request_prompt_tokens", "Prompt tokens an answered request had prefilled, all its choices together.",
    ["route", "model_version"], buckets=TOKEN_COUNT_BUCKETS,
)
REQUEST_GENERATION_TOKENS = Histogram(
    "genloop_request_generation_tokens", "Tokens generated for an answered request, all its choices together.",
    ["route", "model_version"], buckets=TOKEN_COUNT_BUCKETS,
)
# Per sequence (one choice of one prompt: what the engine schedules), as vLLM's histograms are.
QUEUE_TIME = Histogram(
    "genloop_request_queue_time_seconds", "Time a sequence waited in the engine from arrival to first scheduling.",
    ["route", "model_version"], buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "genloop_time_to_first_token_seconds", "Arrival to first generated token, per sequence.",
    ["route", "model_version"], buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "genloop_inter_token_latency_seconds", "Time between two consecutive tokens of a sequence, one observation per "
    "gap.", ["route", "model_version"], buckets=TOKEN_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "genloop_time_per_output_token_seconds", "Mean time between the tokens of a finished sequence (first to last "
    "token over the gaps between them), one observation per sequence.", ["route", "model_version"],
    buckets=TOKEN_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("genloop_prompt_tokens_total", "Prompt tokens processed.", ["route", "model_version"])
GENERATION_TOKENS = Counter("genloop_generation_tokens_total", "Tokens generated.", ["route", "model_version"])
REQUESTS_RUNNING = Gauge("genloop_requests_running", "Sequences being decoded now.", ["model_version"])
REQUESTS_WAITING = Gauge("genloop_requests_waiting", "Sequences queued in the engine, not yet scheduled.",
                         ["model_version"])
MODEL_INFO = Gauge("genloop_model_info", "1 for the model version this replica serves.", ["model_version"])
INFERENCE_LOG_DROPPED = Counter(
    "genloop_inference_log_dropped_total", "Inference-log records dropped because the buffer was full."
)
SHADOW_REQUESTS = Counter(
    "genloop_shadow_requests_total", "Requests mirrored to the shadow (challenger) model, by outcome.", ["outcome"]
)
for _outcome in ("ok", "error"):  # known label values exist from the start: a rate of 0, not no data
    SHADOW_REQUESTS.labels(_outcome)
MODEL_LOADS = Counter("genloop_model_loads_total", "Replicas that loaded a model version.", ["model_version"])
DRIFT_SCORE = Gauge("genloop_drift_score", "Drift score of a prompt feature in the last drift check.", ["feature"])
DRIFT_THRESHOLD = Gauge("genloop_drift_threshold", "Score beyond which the feature counts as drifted.", ["feature"])
DRIFT_DETECTED = Gauge(
    "genloop_drift_detected", "1 when the feature (or, for feature=\"dataset\", the traffic) drifted.", ["feature"]
)
DRIFT_SAMPLES = Gauge("genloop_drift_samples", "Prompts compared in the last drift check, by side.", ["side"])
DRIFT_LAST_RUN = Gauge("genloop_drift_last_run_timestamp_seconds", "When the last drift check ran.")
BATCH_SIZE = Histogram(
    "genloop_batch_size", "Sequences decoded together per engine step.", ["model_version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MODEL_SWAPS = Counter("genloop_model_swaps_total", "Rollouts of a new champion or challenger by the control plane.")


# --- the control plane: what MLflow, the audit log, drift reports and the scheduler record ---------
# These are not counted in-process: training, gates and promotions run in short-lived CLI calls or in
# the scheduler. The control plane's exporter reads the records at scrape time and reports them
# through ``ControlPlaneCollector``, so every process sees the same numbers and none is lost.


# A rating's label in genloop_feedback_ratings, by the rating a caller gives (POST /v1/feedback).
FEEDBACK_RATINGS = {1: "positive", 0: "neutral", -1: "negative"}


class VersionState(BaseModel):
    version: str
    training_seconds: float | None = None
    cost_usd: float | None = None
    energy_kwh: float | None = None
    best_val_loss: float | None = None
    evaluation: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Held-out set → gate metric → value, from its latest gate report; the "
        "caller chooses the metrics (monitoring imports nothing of ours).",
    )


class JobState(BaseModel):
    job: str
    runs: dict[str, int] = Field(default_factory=dict, description="Outcome → runs.")
    last_run: float | None = None
    next_run: float | None = None


class ControlPlaneState(BaseModel):
    training_runs: dict[str, int] = Field(default_factory=dict, description="Outcome → training runs.")
    last_successful_retrain: float | None = None
    versions: list[VersionState] = Field(default_factory=list)
    champion: str | None = None
    champion_since: float | None = None
    alias_changes: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Action (promote, rollback, retrain, …) → outcome → count, from the audit "
        "log."
    )
    jobs: list[JobState] = Field(default_factory=list)
    feedback: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Model version → rating (positive, neutral, negative) → responses of "
        "that version rated so, each at its latest rating, from the inference log.",
    )


class ControlPlaneCollector(Collector):
    """Reports ``read_state()`` as Prometheus families on every scrape."""

    def __init__(self, read_state: Callable[[], ControlPlaneState]):
        self.read_state = read_state

    def describe(self) -> Iterable[Metric]:
        return self._families(ControlPlaneState())

    def collect(self) -> Iterable[Metric]:
        return self._families(self.read_state())

    @staticmethod
    def _families(state: ControlPlaneState) -> list[Metric]:
        runs = CounterMetricFamily("genloop_training_runs", "Training runs by outcome.", labels=["outcome"])
        for outcome in ("finished", "failed"):
            runs.add_metric([outcome], state.training_runs.get(outcome, 0))
        last_retrain = GaugeMetricFamily("genloop_last_successful_retrain_timestamp_seconds",
                                         "End of the newest training run that registered a version.")
        if state.last_successful_retrain is not None:
            last_retrain.add_metric([], state.last_successful_retrain)
        per_version = {
            name: GaugeMetricFamily(f"genloop_training_{name}", text, labels=["model_version"])
            for name, text in (("duration_seconds", "Wall time of the run that trained the version."),
                               ("cost_usd", "Price of the run that trained the version."),
                               ("energy_kwh", "Energy of the run that trained the version."),
                               ("best_val_loss", "Best validation loss of the run that trained the version."))
        }
        evaluation = GaugeMetricFamily("genloop_evaluation_metric", "Gate metrics of a version on a held-out set.",
                                       labels=["model_version", "set", "metric"])
        for version in state.versions:
            for name, value in (("duration_seconds", version.training_seconds), ("cost_usd", version.cost_usd),
                                ("energy_kwh", version.energy_kwh), ("best_val_loss", version.best_val_loss)):
                if value is not None:
                    per_version[name].add_metric([version.version], value)
            for set_name, values in version.evaluation.items():
                for metric, value in values.items():
                    evaluation.add_metric([version.version, set_name, metric], value)
        champion = GaugeMetricFamily("genloop_champion_info", "1 for the version the champion alias names.",
                                     labels=["model_version"])
        since = GaugeMetricFamily("genloop_champion_promoted_timestamp_seconds",
                                  "When the current champion got the alias.")
        if state.champion is not None:
            champion.add_metric([state.champion], 1)
            if state.champion_since is not None:
                since.add_metric([], state.champion_since)
        changes = CounterMetricFamily("genloop_alias_changes", "Promotions, rollbacks, challenger changes and admin "
                                      "retrain requests, by outcome (promoted, rejected, conflict, rolled-back, "
                                      "queued, …).",
                                      labels=["action", "outcome"])
        for action, outcomes in state.alias_changes.items():
            for outcome, count in outcomes.items():
                changes.add_metric([action, outcome], count)
        job_runs = CounterMetricFamily("genloop_scheduler_job_runs", "Scheduler job runs by job and outcome.",
                                       labels=["job", "outcome"])
        last_run = GaugeMetricFamily("genloop_scheduler_last_run_timestamp_seconds", "When a job last ran.",
                                     labels=["job"])
        next_run = GaugeMetricFamily("genloop_scheduler_next_run_timestamp_seconds", "When a job runs next.",
                                     labels=["job"])
        for job in state.jobs:
            for outcome, count in job.runs.items():
                job_runs.add_metric([job.job, outcome], count)
            if job.last_run is not None:
                last_run.add_metric([job.job], job.last_run)
            if job.next_run is not None:
                next_run.add_metric([job.job], job.next_run)
        # Gauges, not counters: a caller who rates a response again moves it from one rating to another.
        ratings = GaugeMetricFamily("genloop_feedback_ratings", "Responses of a version that callers rated, by "
                                    "their latest rating.", labels=["model_version", "rating"])
        positive = GaugeMetricFamily("genloop_feedback_positive_ratio",
                                     "Share of a version's rated responses rated positive.", labels=["model_version"])
        for rated_version, counts in state.feedback.items():
            for label in FEEDBACK_RATINGS.values():
                ratings.add_metric([rated_version, label], counts.get(label, 0))
            rated = sum(counts.values())
            if rated:
                positive.add_metric([rated_version], counts.get("positive", 0) / rated)
        return [runs, last_retrain, *per_version.values(), evaluation, champion, since, changes, job_runs,
                last_run, next_run, ratings, positive]
