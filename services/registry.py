"""Access to the MLflow model registry, the single source of truth for genloop's models.

A model version is a Hugging Face folder logged as the artifact ``model`` of the training run
that produced it, registered under one registered model. Aliases (``champion``, ``previous``,
``challenger``) say which version plays which role; nothing else stores that.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from genloop.services.config import GenloopConfig
from genloop.serving.model_store import local_model
from genloop.training.errors import UserInputError

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


class UnknownVersion(UserInputError):
    """No registered version is, or is aliased, what the caller named (the admin API's 404)."""


class Registry:
    """The registered model of one genloop deployment, and its experiment."""

    def __init__(self, config: GenloopConfig):
        config.home.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.name = config.tracking.registered_model
        self.client = MlflowClient(tracking_uri=config.mlflow_tracking_uri, registry_uri=config.mlflow_tracking_uri)

    @property
    def tracking_uri(self) -> str:
        return self.config.mlflow_tracking_uri

    @property
    def tracking_server(self) -> str | None:
        """The tracking URI when it is an MLflow server (which has an artifact store of its own and
        resolves ``mlflow-artifacts:/`` URIs), None when it is a database."""
        return self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else None

    def experiment_id(self) -> str:
        """The training experiment, created on first use with artifacts at ``tracking.artifact_location``."""
        name = self.config.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # A database tracking URI has no artifact root of its own: MLflow would put artifacts in the
        # working directory's ./mlruns. A tracking server has one (--artifacts-destination).
        location = self.config.tracking.artifact_location
        if location is None and self.tracking_server is None:
            location = self.config.mlflow_artifacts_dir.as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def register(self, run_id: str, tags: dict[str, str]) -> ModelVersion:
        """Register the run's ``model`` artifact as the next version of the registered model."""
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description="genloop's generative text models")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        return self.client.create_model_version(self.name, source=source, run_id=run_id, tags=tags)

    def versions(self) -> list[ModelVersion]:
        """All versions, oldest first."""
        try:
            found = self.client.search_model_versions(f"name = '{self.name}'")
        except MlflowException:
            return []
        return sorted(found, key=lambda v: int(v.version))

    def aliases_by_version(self) -> dict[str, list[str]]:
        """Version → its aliases (version search results do not carry aliases)."""
        try:
            aliases = self.client.get_registered_model(self.name).aliases
        except MlflowException:
            return {}
        by_version: dict[str, list[str]] = {}
        for alias, version in sorted(aliases.items()):
            by_version.setdefault(str(version), []).append(alias)
        return by_version

    def resolve(self, ref: str | int) -> ModelVersion:
        """``ref`` is a version number ("3", "v3") or an alias ("champion"); unknown → UserInputError."""
        ref = str(ref).strip()
        match = re.fullmatch(r"v?(\d+)", ref)
        try:
            if match:
                return self.client.get_model_version(self.name, match.group(1))
            return self.client.get_model_version_by_alias(self.name, ref)
        except MlflowException:
            known = ", ".join(f"v{v.version}" for v in self.versions()) or "none registered yet"
            raise UnknownVersion(f"unknown model version or alias {ref!r} (versions: {known})") from None

    def alias_version(self, alias: str) -> ModelVersion | None:
        """The version behind ``alias``, or None when the alias is not set."""
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def local_path(self, version: ModelVersion) -> Path:
        """A folder on this node holding the version's Hugging Face files (``serving.model_store``)."""
        return local_model(version.source, str(version.version), tracking_uri=self.tracking_uri)

    def lineage(self, version: ModelVersion) -> list[ModelVersion]:
        """``version``, its parent, and so on back to the model trained from scratch."""
        chain: list[ModelVersion] = []
        current: ModelVersion | None = version
        while current is not None and current.version not in {v.version for v in chain}:
            chain.append(current)
            parent = current.tags.get("parent_version")
            current = self.resolve(parent) if parent else None
        return chain

    def lineage_datasets(self, version: ModelVersion) -> list[str]:
        """Datasets of ``version`` and its ancestors (warm starts carry what their parents learned)."""
        datasets: list[str] = []
        for member in self.lineage(version):
            dataset = member.tags.get("dataset")
            if dataset and dataset not in datasets:
                datasets.append(dataset)
        return datasets
