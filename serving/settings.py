"""What a replica and its deployment are told: the one definition of every serving setting and default.

``ServerSettings`` travels to each replica (pickled by Serve), ``DeploymentOptions`` to Serve when
the application is built. The user's ``serving`` config section (``services.config.ServingConfig``)
reuses these fields, defaults and descriptions included, so a default is written once, here, and
the config reference a user reads is the same text. Importing this module stays cheap (no Ray, no
torch): the config imports it.
"""

from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genloop.serving.engine import Engine, EngineOptions
from genloop.serving.model_store import local_model

# What the inference log keeps of prompts and outputs (monitoring.log_text).
LogText = Literal["full", "redacted", "hashed"]


class ServerSettings(BaseModel):
    """Everything a replica needs; built by the control plane (``services.serving_control``)."""

    model_config = ConfigDict(frozen=True)

    served_model_name: str = Field("genloop", description="The model name clients pass as `model`.")
    model_uri: str = Field(
        description="The served version's Hugging Face folder: a path, or the registry's artifact URI (file://, "
        "s3://, mlflow-artifacts:/…), which each replica fetches onto its own node (``serving.model_store``).")
    registry_uri: str | None = Field(
        None, description="The MLflow tracking server that resolves mlflow-artifacts:/ model URIs; None when the "
        "URI is direct.")
    model_version: str = Field(description="Registry version served (stamped on every response).")
    engine_class: type[Engine] = Field(description="Engine subclass to instantiate.")
    engine_options: EngineOptions | None = Field(
        None, description="The engine's options (its ``Options`` model); None = the engine's defaults.")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys accepted; empty = no auth.")
    public_paths: list[str] = Field(
        default_factory=list,
        description="Paths answered without an API key once GENLOOP_API_KEYS is set; every other path, "
        "/metrics and /openapi.json included, needs the key (Prometheus sends it as a bearer token). "
        "/health is always public: a deployment of its own answers it.")
    max_requests_per_client: int | None = Field(
        32, ge=1, description="Requests one client (its API key, else its address) may have in one replica at "
        "once; past it an immediate 429, so one client cannot hold every slot. None = no limit (behind a "
        "proxy without API keys every client has the proxy's address).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request bodies past this many bytes get 413, "
                                "counted as they arrive whatever the transfer encoding.")
    body_timeout_s: float = Field(10.0, gt=0, description="A request body not received whole within this gets "
                                  "408: a slow upload does not hold a request slot for longer.")
    inference_log_dir: str | None = Field(None, description="Where the inference log goes; None = off.")
    log_text: LogText = Field(
        "full", description="What the inference log keeps of prompts and outputs: full text (drift and the "
        "gate's live set read it), redacted (e-mails, phones, IPs and keys scrubbed as in training data) or "
        "hashed (length and hash only: no prompt drift, no live set).")
    log_flush_s: float = Field(
        1.0, gt=0, description="Each replica writes its spooled log rows to parquet at least this often: how "
        "soon they can be read. A replica killed outright loses none: the next one on the host writes its spool.")
    client_salt: str = Field(default_factory=lambda: secrets.token_hex(32),
                             description="Secret key of the hashed client ids in the log; genloop serve passes "
                             "the installation's, a bare replica makes its own.")
    shadow_percent: float = Field(
        0, ge=0, le=100,
        description="Share of requests (%) mirrored to the `challenger` alias; its answers are logged, never returned.")
    scrape_targets_dir: str | None = Field(
        None, description="Where each replica announces its own /metrics port to Prometheus; None = not announced.")

    def build_engine(self) -> Engine:
        model = local_model(self.model_uri, self.model_version, tracking_uri=self.registry_uri)
        return self.engine_class(model, self.model_version, self.engine_options)


class Autoscaling(BaseModel):
    """Serve's request-driven autoscaling of the model's replicas (its ``autoscaling_config``): Serve adds
    replicas while each holds more than ``target_ongoing_requests`` on average, and removes them when
    fewer would do, between ``min_replicas`` and ``max_replicas``. Replicas spread over the cluster's
    nodes (Serve's default placement)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=1, description="Replicas kept however quiet it is (at least one: a replica "
                              "loads its model for seconds to minutes, so none would mean a cold first request).")
    max_replicas: int = Field(ge=1, description="Replicas at most, however busy.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Requests per replica Serve aims at; with continuous batching a replica serves "
        "several at once, so this is well above 1.")
    upscale_delay_s: float = Field(10, ge=0, description="How long load must stay above target before a replica "
                                   "is added.")
    downscale_delay_s: float = Field(300, ge=0, description="How long load must stay below target before a "
                                     "replica is removed (long: a new replica costs a model load).")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class DeploymentOptions(BaseModel):
    """How Serve runs the model's deployment: replicas, their resources and the backpressure limits.

    A replica takes ``max_ongoing_requests`` at once, a caller waits in a queue of
    ``max_queued_requests``, and beyond that Serve answers 429 with Retry-After at once: never an
    unbounded queue.
    """

    model_config = ConfigDict(frozen=True)

    num_replicas: int = Field(1, ge=1, description="Serve replicas (one engine each); ignored with autoscaling.")
    autoscaling: Autoscaling | None = Field(
        None, description="Serve's autoscaling of the replicas by load; None keeps num_replicas replicas.")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="Replicas one node may hold (Serve's max_replicas_per_node): 1 puts each replica on "
        "its own node, so losing a node loses one replica; a rollout then replaces replicas one at a time. None: "
        "Serve spreads them by best effort.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at once (Serve).")
    max_queued_requests: int = Field(256, ge=1, description="Requests waiting for a replica; beyond this 429.")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica (and the shadow's).")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica (Ray hides GPUs from "
                                "actors that reserve none).")
