"""genloop's configuration: one YAML file, typed sections, environment overrides.

Every part of genloop reads its settings from the models here, so this module imports
nothing of ours (training/, serving/ and monitoring/ may import it; see DESIGN.md).
Precedence, highest first: ``GENLOOP_<SECTION>__<FIELD>`` environment variables, the YAML
file, the defaults below. Unknown keys are an error that names the key, because a typo in
a config file that is silently ignored is a production incident waiting to happen.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import closing
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = "genloop.yaml"


class UserInputError(ValueError):
    """Bad input from a user (a path, a name, an option): the CLI prints it and exits with code 2.

    It lives here, beside the config models, because every package raises it and this is the one
    module of services/ that training/, serving/ and monitoring/ may import.
    """


ECHO_CHARS = 64


def echo(value: str) -> str:
    """What an error message repeats of its input: the start, never a 100 KB name whole."""
    return value if len(value) <= ECHO_CHARS else f"{value[:ECHO_CHARS]}… ({len(value)} chars)"


class ConfigError(UserInputError):
    """The configuration file or an override is invalid; the message names the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, values re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    txt_mode: Literal["file", "paragraph"] = Field(
        "paragraph", description="How .txt files become documents: the whole file, or one per blank-line paragraph."
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json/.csv/.parquet sources.")
    licence: str = Field("unknown", description="Licence recorded for sources that do not state one.")
    min_chars: int = Field(64, ge=1, description="Documents shorter than this (after normalisation) are dropped.")
    max_chars: int = Field(20_000, ge=1, description="Documents longer than this are dropped.")
    max_symbol_share: float = Field(
        0.35, ge=0, le=1, description="Drop documents whose share of non-printable or symbol characters exceeds this."
    )
    max_repeated_line_share: float = Field(
        0.5, ge=0, le=1, description="Drop documents whose share of repeated (non-unique) lines exceeds this."
    )
    near_dup_threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard similarity at or above which a document is a near duplicate."
    )
    minhash_num_perm: int = Field(128, ge=16, description="MinHash permutations; more is more exact and slower.")
    shingle_words: int = Field(5, ge=1, description="Word n-gram size of the shingles MinHash compares.")
    scrub_pii: bool = Field(False, description="Replace e-mails, phone numbers and IP addresses with placeholders.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of documents (chosen by content hash, stable across versions) held out."
    )
    max_documents_per_source: int | None = Field(
        None, ge=1, description="Cap on documents read from one source, for quick runs; None reads everything."
    )


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=300, description="Byte-level BPE vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur at least this often in the train split.")


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights; merged on export.")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None lets peft pick the defaults for the architecture."
    )


class TrainConfig(Section):
    preset: str = Field("tiny", description="Model preset when training from scratch (see `genloop train --help`).")
    block_size: int = Field(128, ge=8, description="Tokens per packed training sequence.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not on biases and norms).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before the cosine decay.")
    max_steps: int = Field(300, ge=1, description="Optimizer steps at most.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    eval_every: int = Field(50, ge=1, description="Validate (and checkpoint) every this many optimizer steps.")
    eval_batches: int = Field(8, ge=1, description="Validation micro-batches per worker per validation.")
    patience: int = Field(3, ge=1, description="Stop after this many validations without improvement.")
    min_delta: float = Field(1e-3, ge=0, description="Validation loss must drop by more than this to count.")
    seed: int = Field(0, description="Seed for weights, data order and sampling.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 autocast on CUDA.")
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="CPUs reserved per training worker (torch threads = max(1, round(this))). Leave at least one "
        "CPU of the cluster unreserved: Ray Data needs it to stream the shards.",
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts (resuming from the last checkpoint).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA fine-tuning.")


GateMetric = Literal["perplexity", "bits_per_byte", "bleu", "chrf", "rouge_l", "ms_per_token"]


class EvaluationConfig(Section):
    max_texts: int = Field(200, ge=1, description="Held-out texts per set scored for perplexity.")
    prompts: int = Field(16, ge=1, description="Held-out continuation prompts per set (BLEU/chrF/ROUGE-L, latency).")
    prompt_words: int = Field(24, ge=1, description="Words of a held-out text given as the prompt.")
    reference_words: int = Field(16, ge=1, description="Following words the continuation is scored against.")
    max_new_tokens: int = Field(48, ge=1, description="Greedy tokens generated per prompt.")
    stride: int = Field(64, ge=1, description="Sliding-window stride of perplexity on texts longer than the context.")
    seed: int = Field(0, description="Seed that picks the held-out prompts.")
    samples_in_report: int = Field(8, ge=1, description="Prompts shown side by side in the HTML report.")


class GateConfig(Section):
    """The project's objective: what a candidate must show to replace the champion."""

    primary_metric: GateMetric = Field(
        "bits_per_byte",
        description="Metric the candidate must improve. bits_per_byte compares models with different "
        "tokenizers; token-level perplexity only compares models that share one.",
    )
    min_improvement: float = Field(
        0.01, ge=0, description="Relative improvement of the primary metric on the 'current' set, at least."
    )
    max_regression: float = Field(
        0.02, ge=0, description="Relative regression of the primary metric on the 'reference' set, at most."
    )
    ceilings: dict[GateMetric, float] = Field(
        default_factory=lambda: {"perplexity": 1000.0},
        description="Absolute upper bounds on the 'current' set (the first model is judged by these alone).",
    )
    floors: dict[GateMetric, float] = Field(
        default_factory=dict, description="Absolute lower bounds on the 'current' set, e.g. {chrf: 10}."
    )
    traffic_weighting: bool = Field(
        True, description="Weigh the 'current' and 'reference' gains by the share of recent live prompts that "
        "look like each (a domain classifier); off, or without enough live prompts, 'current' alone must improve.",
    )
    live_prompts: int = Field(
        200, ge=0, description="Recent live prompts (monitoring.drift_window of the inference log) sampled as the "
        "third held-out set, 'live', and to measure the traffic shares; 0 = no live set.",
    )
    min_live_prompts: int = Field(
        50, ge=1, description="Fewer live prompts than this: no 'live' set and no traffic weighting."
    )


class ServingConfig(Section):
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    model_name: str = Field("genloop", description="The model name clients pass as `model`.")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf (transformers, CPU/GPU) or vllm (GPU only).")
    device: str = Field("cpu", description="Device of the hf engine (cpu, cuda).")
    num_replicas: int = Field(1, ge=1, description="Serve replicas (one engine each).")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica (and the shadow's).")
    replica_gpus: float | None = Field(
        None, ge=0, description="GPUs Ray reserves for each replica; None: 1 for a cuda device or the vllm engine, "
        "else 0 (Ray hides GPUs from actors that reserve none). Below 1, e.g. 0.5, lets a new replica start beside "
        "the old one on a single GPU during a rollout.",
    )
    max_batch_size: int = Field(32, ge=1, description="Most sequences one replica decodes together.")
    max_wait_ms: float = Field(5, ge=0, description="How long an idle engine waits to batch a burst.")
    max_queue_size: int = Field(1024, ge=1, description="Requests waiting in an engine beyond this get 429.")
    stream_events_per_step: int = Field(
        8, ge=1, description="Most streamed chunks the hf engine hands out per decoding step; with more streams, "
        "each chunk carries several tokens (a host-overhead cap; ≥ max_batch_size streams every token).",
    )
    max_prefill_tokens: int = Field(
        1024, ge=1, description="Most padded prompt positions in one prefill forward of the hf engine; a burst "
        "of newcomers is prefilled shortest first in groups under this (less padding, earlier first tokens).",
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at once (Serve).")
    max_queued_requests: int = Field(256, ge=1, description="Requests waiting for a replica; beyond this 429.")
    int8: bool = Field(False, description="int8 dynamic quantisation of the hf engine on CPU.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request bodies past this many bytes get 413, "
                                "counted as they arrive whatever the transfer encoding.")
    body_timeout_s: float = Field(10.0, gt=0, description="A request body not received whole within this gets "
                                  "408: a slow upload does not hold a request slot for longer.")
    public_paths: list[str] = Field(
        default_factory=list,
        description="Paths answered without an API key once GENLOOP_API_KEYS is set; every other path, "
        "/metrics and /openapi.json included, needs the key (Prometheus sends it as a bearer token). "
        "/health is always public: a deployment of its own answers it.")
    max_requests_per_client: int | None = Field(
        32, ge=1, description="Requests one client (its API key, else its address) may have in one replica at "
        "once; past it an immediate 429, so one client cannot hold every slot. None = no limit (behind a "
        "proxy without API keys every client has the proxy's address).")
    watch_interval_s: float = Field(
        10, gt=0, description="How often the champion and challenger aliases are checked for a new version."
    )
    shadow_percent: float = Field(
        0, ge=0, le=100,
        description="Share of requests (%) mirrored to the `challenger` alias; its answers are logged, never returned.",
    )
    inference_log: bool = Field(True, description="Write every request to $GENLOOP_HOME/inference-log.")
    inference_log_flush_s: float = Field(
        1.0, gt=0, description="Each replica writes its spooled log rows to parquet at least this often: how "
        "soon they can be read. A replica killed outright loses none: the next one on the host writes its spool.")

    @property
    def gpus_per_replica(self) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        return 1.0 if self.engine == "vllm" or self.device.startswith("cuda") else 0.0


# What the inference log keeps of prompts and outputs (monitoring.log_text).
LogText = Literal["full", "redacted", "hashed"]


class MonitoringConfig(Section):
    log_text: LogText = Field(
        "full", description="What the inference log keeps of prompts and outputs: full text (drift and the "
        "gate's live set read it), redacted (e-mails, phones, IPs and keys scrubbed as in training data) or "
        "hashed (length and hash only: no prompt drift, no live set).")
    scrape_targets_dir: Path | None = Field(
        None, description="Prometheus file_sd directory where every replica and the control plane announce their "
        "metrics port; None uses $GENLOOP_HOME/prometheus/targets (shared storage on multi-node)."
    )
    exporter_port: int = Field(
        9464, ge=0, le=65535, description="Port of the control plane's metrics (training, gate, drift); 0 = any free."
    )
    drift_window: timedelta = Field(
        timedelta(hours=24), description="Live traffic compared by `genloop drift` (ISO 8601 or seconds; CLI: 24h)."
    )
    drift_reference_window: tuple[datetime, datetime] | None = Field(
        None, description="Pinned [start, end) of the inference log used as reference; None samples the champion's "
        "training texts, cut to prompt-like prefixes."
    )
    drift_prefix_words: tuple[int, int] = Field(
        (8, 48), description="Training texts become reference prompts of this many words (uniform, inclusive)."
    )
    drift_max_samples: int = Field(2000, ge=10, description="Prompts sampled from each side at most (bounds cost).")
    drift_min_samples: int = Field(50, ge=2, description="Fewer prompts on either side → 'insufficient data'.")
    drift_threshold: float = Field(
        0.1, gt=0, description="Normed Wasserstein distance beyond which a numerical prompt feature drifted."
    )
    drift_share: float = Field(0.5, gt=0, le=1, description="Share of drifted features that makes the verdict drift.")


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
    replay_fraction: float = Field(
        0.25, ge=0, lt=1, description="Share of a warm-start retrain's training text (in characters) replayed "
        "from the data the champion and its ancestors trained on, so it does not forget it; 0 = the new "
        "documents alone.",
    )
    retrain_budget: float = Field(
        0.2, gt=0, description="Most compute a warm-start retrain may spend: up to 1, a share of its lineage's "
        "from-scratch training compute; above 1, optimizer steps. Early stopping may end it sooner.",
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
            cls.cron_trigger(value)  # APScheduler's ValueError names the bad field
        return value

    @staticmethod
    def cron_trigger(expression: str) -> Any:
        """An APScheduler CronTrigger (UTC) that reads ``expression`` as crontab(5) does.

        APScheduler 3 numbers weekdays from Monday = 0 and crontab from Sunday = 0 (or 7), so "1"
        would fire on Tuesdays; the weekday field is expanded here, crontab's way, into day names.
        Crontab fires when the day of month *or* the weekday matches if both are given, APScheduler
        only when both do: such an expression is refused rather than run on other days.
        """
        from datetime import UTC

        from apscheduler.triggers.cron import CronTrigger

        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(f"crontab needs 5 fields (minute hour day month weekday), got {len(fields)}")
        if fields[2] != "*" and fields[4] != "*":
            raise ValueError("give the day of month or the weekday, not both (crontab would fire on either)")
        if fields[4] != "*":
            fields[4] = ",".join(_WEEKDAYS[day] for day in sorted(_crontab_weekdays(fields[4])))
        return CronTrigger.from_crontab(" ".join(fields), timezone=UTC)


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


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None uses sqlite:///$GENLOOP_HOME/mlflow.db."
    )
    experiment: str = Field("genloop", description="MLflow experiment that training runs are logged to.")
    registered_model: str = Field("genloop", description="Registered model whose versions are genloop's models.")


class CostConfig(Section):
    price_per_device_hour: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.05, "cuda": 3.5},
        description="Price in $ per device-hour, by device type (cpu = per worker, cuda = per GPU).",
    )
    watts_per_device: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 15.0, "cuda": 700.0}, description="Power draw per device, for energy kWh."
    )
    peak_flops_per_device: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 1.0e11, "cuda": 989.0e12},
        description="Peak dense FLOP/s per device (bf16 on GPUs), the denominator of model FLOPs utilisation.",
    )


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts an embedded local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray; None uses all.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared on multi-node); None uses $GENLOOP_HOME/ray."
    )


class GenloopConfig(BaseSettings):
    """The whole configuration. ``GENLOOP_HOME`` sets ``home``; sections nest with ``__``."""

    model_config = SettingsConfigDict(
        env_prefix="GENLOOP_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    home: Path = Field(Path(".genloop"), description="Where all state lives (datasets, MLflow, Ray, reports).")
    data: DataConfig = Field(default_factory=DataConfig, description="Ingestion and cleaning.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer training.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training on Ray Train.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Cost and energy report.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Held-out evaluation.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate policy.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="The OpenAI-compatible endpoint.")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig, description="Metrics and drift.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Retraining on a schedule.")
    state_db_url: str | None = Field(
        None, description="SQLAlchemy URL of genloop's own tables (promotion audit); None uses "
        "sqlite:///$GENLOOP_HOME/genloop.db."
    )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Ray workers run in their own working directory: every path handed to them must be absolute.
        return home.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; environment variables must beat it.
        return env_settings, init_settings

    # Derived locations (DESIGN.md "Data and state").
    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.tracking.tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return (self.home / "mlartifacts").resolve()

    @property
    def inference_log_dir(self) -> Path:
        return self.home / "inference-log"

    @property
    def scrape_targets_dir(self) -> Path:
        return (self.monitoring.scrape_targets_dir or self.home / "prometheus" / "targets").resolve()

    @property
    def state_db(self) -> str:
        return self.state_db_url or f"sqlite:///{(self.home / 'genloop.db').resolve()}"

    @property
    def scheduler_db(self) -> str:
        return self.scheduler.job_store_url or f"sqlite:///{(self.home / 'scheduler.db').resolve()}"

    def check_databases(self) -> None:
        """Every SQLite state file that exists opens as a database: a damaged or foreign file is one
        error naming it before a command starts work, not SQLAlchemy's traceback half-way through."""
        for url in (self.mlflow_tracking_uri, self.state_db, self.scheduler_db):
            path = Path(url.removeprefix("sqlite:///"))
            if not url.startswith("sqlite:///") or not path.is_file():
                continue
            try:
                with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                    db.execute("PRAGMA schema_version").fetchone()
            except sqlite3.DatabaseError as exc:
                raise UserInputError(f"{path}: not a SQLite database genloop can use ({exc}); "
                                     "move it aside to start afresh") from None

    @property
    def ray_storage_path(self) -> str:
        return self.ray.storage_path or str((self.home / "ray").resolve())


def load_config(path: str | Path | None = None) -> GenloopConfig:
    """Read ``path`` (or ``$GENLOOP_CONFIG``, or ``./genloop.yaml`` when present) plus env overrides."""
    explicit = path or os.environ.get("GENLOOP_CONFIG")
    file = Path(explicit) if explicit else Path(DEFAULT_CONFIG_FILE)
    values: dict[str, Any] = {}
    if file.exists():
        try:
            values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read it: {exc.strerror}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
    elif explicit:
        raise ConfigError(f"config file {file} does not exist")
    try:
        return GenloopConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: "
            + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({file}): {problems}") from None


def config_hash(section: BaseModel) -> str:
    """Stable short hash of a config section, tagged on model versions to tell runs apart."""
    payload = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
