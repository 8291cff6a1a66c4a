"""genloop's configuration: one YAML file, typed sections, environment overrides.

Each package owns its settings (``training.config``, ``serving.settings`` and the HF engine's
options, ``monitoring.drift_settings``, ``services.schedule``); ``GenloopConfig`` composes them into
the one file, and a key whose definition belongs to a package reuses that definition. Nothing below
``services`` imports this module.

Precedence, highest first: ``GENLOOP_<SECTION>__<FIELD>`` environment variables, the YAML
file, the defaults below. Unknown keys are an error that names the key, because a typo in
a config file that is silently ignored is a production incident waiting to happen.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from genloop.monitoring.drift_settings import DriftSettings
from genloop.services.schedule import SchedulerConfig
from genloop.serving.hf.options import HFEngineOptions
from genloop.serving.settings import Autoscaling, DeploymentOptions, LogText, ServerSettings
from genloop.training.config import (
    CostConfig,
    DataConfig,
    EvaluationConfig,
    GateMetric,
    Section,
    TokenizerConfig,
    TrainConfig,
    TuningConfig,
)
from genloop.training.errors import UserInputError

DEFAULT_CONFIG_FILE = "genloop.yaml"


class ConfigError(UserInputError):
    """The configuration file or an override is invalid; the message names the key."""


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


def _reuse(model: type[BaseModel], name: str) -> Any:
    """The field ``name`` of ``model``, default, bounds and description included: a config key whose
    definition belongs to the package that uses it is written there once and reused here."""
    return model.model_fields[name]


class ServingConfig(Section):
    """The OpenAI-compatible endpoint. Most keys are serving's own settings (``serving.settings``, the
    HF engine's ``HFEngineOptions``), reused here under the names users know."""

    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    model_name: str = _reuse(ServerSettings, "served_model_name")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf (transformers, CPU/GPU) or vllm (GPU only).")
    device: str = _reuse(HFEngineOptions, "device")
    num_replicas: int = _reuse(DeploymentOptions, "num_replicas")
    autoscaling: Autoscaling | None = _reuse(DeploymentOptions, "autoscaling")
    max_replicas_per_node: int | None = _reuse(DeploymentOptions, "max_replicas_per_node")
    replica_cpus: float = _reuse(DeploymentOptions, "replica_cpus")
    replica_gpus: float | None = Field(
        None, ge=0, description="GPUs Ray reserves for each replica; None: 1 for a cuda device or the vllm engine, "
        "else 0 (Ray hides GPUs from actors that reserve none). Below 1, e.g. 0.5, lets a new replica start beside "
        "the old one on a single GPU during a rollout.",
    )
    max_batch_size: int = _reuse(HFEngineOptions, "max_batch_size")
    max_wait_ms: float = _reuse(HFEngineOptions, "max_wait_ms")
    max_queue_size: int = _reuse(HFEngineOptions, "max_queue_size")
    stream_events_per_step: int = _reuse(HFEngineOptions, "stream_events_per_step")
    max_prefill_tokens: int = _reuse(HFEngineOptions, "max_prefill_tokens")
    max_ongoing_requests: int = _reuse(DeploymentOptions, "max_ongoing_requests")
    max_queued_requests: int = _reuse(DeploymentOptions, "max_queued_requests")
    int8: bool = _reuse(HFEngineOptions, "int8")
    max_body_bytes: int = _reuse(ServerSettings, "max_body_bytes")
    body_timeout_s: float = _reuse(ServerSettings, "body_timeout_s")
    public_paths: list[str] = _reuse(ServerSettings, "public_paths")
    max_requests_per_client: int | None = _reuse(ServerSettings, "max_requests_per_client")
    watch_interval_s: float = Field(
        10, gt=0, description="How often the champion and challenger aliases are checked for a new version."
    )
    shadow_percent: float = _reuse(ServerSettings, "shadow_percent")
    inference_log: bool = Field(True, description="Write every request to $GENLOOP_HOME/inference-log.")
    inference_log_flush_s: float = _reuse(ServerSettings, "log_flush_s")

    @property
    def gpus_per_replica(self) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        return 1.0 if self.engine == "vllm" or self.device.startswith("cuda") else 0.0

    def deployment(self) -> DeploymentOptions:
        return DeploymentOptions(num_replicas=self.num_replicas, autoscaling=self.autoscaling,
                                 max_replicas_per_node=self.max_replicas_per_node,
                                 max_ongoing_requests=self.max_ongoing_requests,
                                 max_queued_requests=self.max_queued_requests, replica_cpus=self.replica_cpus,
                                 replica_gpus=self.gpus_per_replica)

    def hf_options(self) -> HFEngineOptions:
        return HFEngineOptions(**self.model_dump(include=set(HFEngineOptions.model_fields)))


class MonitoringConfig(Section):
    log_text: LogText = _reuse(ServerSettings, "log_text")
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
    drift_max_samples: int = _reuse(DriftSettings, "max_samples")
    drift_min_samples: int = _reuse(DriftSettings, "min_samples")
    drift_threshold: float = _reuse(DriftSettings, "num_threshold")
    drift_share: float = _reuse(DriftSettings, "drift_share")

    def drift_settings(self) -> DriftSettings:
        return DriftSettings(max_samples=self.drift_max_samples, min_samples=self.drift_min_samples,
                             num_threshold=self.drift_threshold, drift_share=self.drift_share)


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI: a database (sqlite:///…, postgresql+psycopg://…) or a tracking "
        "server (http(s)://…); None uses sqlite:///$GENLOOP_HOME/mlflow.db."
    )
    artifact_location: str | None = Field(
        None, description="Artifact URI of the experiment genloop creates (s3://…, file://…); None: the tracking "
        "server's own with an http(s) tracking URI, else $GENLOOP_HOME/mlartifacts."
    )
    experiment: str = Field("genloop", description="MLflow experiment that training runs are logged to.")
    registered_model: str = Field("genloop", description="Registered model whose versions are genloop's models.")


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts an embedded local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray; None uses all.")
    storage_path: str | None = Field(
        None, description="Ray Train storage (shared on multi-node); None uses $GENLOOP_HOME/ray."
    )


class ServiceConfig(Section):
    """``genloop up``: its admin API and how it stops."""

    admin_host: str = Field(
        "127.0.0.1", description="Bind address of the admin API; one that is not loopback needs GENLOOP_ADMIN_TOKEN."
    )
    admin_port: int = Field(8001, ge=0, le=65535, description="Port of the admin API; 0 = any free port (printed).")
    shutdown_grace_s: float = Field(
        30, ge=0, description="On Ctrl-C or SIGTERM, how long a running job may take to finish; after that it is "
        "recorded as interrupted and stopped with the service.",
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
    tuning: TuningConfig = Field(default_factory=TuningConfig, description="`genloop tune`'s search space.")
    service: ServiceConfig = Field(default_factory=ServiceConfig, description="`genloop up` and its admin API.")
    datasets_uri: str | None = Field(
        None, description="Where dataset versions live: a folder, or an object-store URI every node reads "
        "(s3://bucket/prefix, with the standard AWS variables); None uses $GENLOOP_HOME/datasets."
    )
    inference_log_uri: str | None = Field(
        None, description="Where every replica writes the inference log, and drift, the gate and feedback read "
        "it: a folder, or an object-store URI (s3://bucket/prefix); None uses $GENLOOP_HOME/inference-log."
    )
    state_db_url: str | None = Field(
        None, description="SQLAlchemy URL of genloop's own tables (the promotion audit and the lock on alias "
        "changes) and of the one-`genloop up` lock: PostgreSQL (postgresql+psycopg://…) for more than one host; "
        "None uses sqlite:///$GENLOOP_HOME/genloop.db."
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
    def datasets_dir(self) -> str:
        """The dataset store's root (``training.dataset_store``): a folder or URI, as a string."""
        return self.datasets_uri or str(self.home / "datasets")

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
    def inference_log_dir(self) -> str:
        """The inference log's root (``serving.inference_log``): a folder or URI, as a string."""
        return self.inference_log_uri or str(self.home / "inference-log")

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

    def shown(self) -> dict[str, Any]:
        """The configuration as ``genloop config show`` prints it: plain JSON-compatible values with
        secrets masked (see ``mask_secrets``), because that output is pasted into tickets and chats."""
        return mask_secrets(self.model_dump(mode="json"))


MASK = "***"
# Query parameters that carry credentials in database, tracking and presigned URLs (password=, token=, ...).
_SECRET_PARAMETER = re.compile(
    r"(?i)((?:^|&)[^=&]*(?:password|passwd|secret|token|key|signature|credential)[^=&]*=)[^&]*")


def mask_url(value: str) -> str:
    """``value`` with a URL's password (``postgresql://user:secret@host``) and credential-like query
    parameters replaced by ``***``; a value that is not such a URL comes back unchanged."""
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:  # not a URL (an unbalanced '[' in the host part)
        return value
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}" if password else parts.netloc
    query = _SECRET_PARAMETER.sub(rf"\g<1>{MASK}", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return value
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def mask_secrets(values: Any) -> Any:
    """``values`` (a JSON-mode ``model_dump``) with every URL-valued string passed through ``mask_url``.
    Fields typed ``SecretStr`` are dumped as asterisks by pydantic already."""
    if isinstance(values, dict):
        return {key: mask_secrets(value) for key, value in values.items()}
    if isinstance(values, list):
        return [mask_secrets(value) for value in values]
    return mask_url(values) if isinstance(values, str) and "://" in values else values


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
        raise ConfigError(f"invalid configuration ({file}): {_problems(exc)}") from None


def _problems(exc: ValidationError, prefix: str = "") -> str:
    return "; ".join(f"{prefix}{'.'.join(str(p) for p in err['loc'])}: "
                     + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"]) for err in exc.errors())


def load_train_settings(path: Path, train: TrainConfig) -> TrainConfig:
    """``train`` with the ``train:`` section of ``path`` over it: the settings ``genloop tune`` wrote."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a YAML settings file: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from exc
    if not isinstance(values, dict) or set(values) != {"train"} or not isinstance(values["train"], dict):
        raise ConfigError(f"{path}: a settings file holds one mapping, `train:` (as `genloop tune` writes it)")
    try:
        return TrainConfig(**{**train.model_dump(), **values["train"]})
    except ValidationError as exc:
        raise ConfigError(f"invalid settings ({path}): {_problems(exc, 'train.')}") from None


def config_hash(section: BaseModel) -> str:
    """Stable short hash of a config section, tagged on model versions to tell runs apart."""
    payload = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
