"""What the listings show: ``genloop models`` and ``GET /admin/models`` each registered version with
its roles, data, metrics, verdict, cost and how callers rated it; ``genloop data list`` the versions
of a dataset.

One record per listing, for the table, ``--json`` and the admin API alike, so they always say the
same thing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.serving.inference_log import feedback_by_version
from genloop.training.cost import COST_USD_TAG
from genloop.training.dataset_store import check_name, list_versions, resolve_dataset


class ModelRow(BaseModel):
    version: str
    aliases: list[str] = Field(description="champion, previous, challenger: the roles the version plays.")
    dataset: str = Field(description="Dataset version it trained on, name:vN.")
    parent_version: str | None = Field(description="Version it was warm-started from; None: from scratch.")
    best_val_loss: float | None
    best_val_perplexity: float | None
    verdict: str | None = Field(description="The gate's verdict on its latest evaluation.")
    cost_usd: float | None
    created_at: datetime
    ratings: dict[str, int] = Field(description="Callers' feedback on its answers: positive, neutral, negative.")
    positive_share: float | None = Field(description="Positive ratings over all ratings; None without any.")


_RATING_NAMES = {1: "positive", 0: "neutral", -1: "negative"}


def list_models(config: GenloopConfig) -> list[ModelRow]:
    registry = Registry(config)
    aliases = registry.aliases_by_version()
    feedback = feedback_by_version(config.inference_log_dir)
    rows = []
    for version in registry.versions():
        metrics = registry.client.get_run(version.run_id).data.metrics if version.run_id else {}
        number = str(version.version)
        ratings = {_RATING_NAMES[rating]: count for rating, count in sorted(feedback.get(number, {}).items())}
        rated = sum(ratings.values())
        cost = version.tags.get(COST_USD_TAG)
        rows.append(ModelRow(
            version=number, aliases=aliases.get(number, []), dataset=version.tags.get("dataset", ""),
            parent_version=version.tags.get("parent_version") or None,
            best_val_loss=metrics.get("best_val_loss"), best_val_perplexity=metrics.get("best_val_perplexity"),
            verdict=version.tags.get("evaluation_verdict"), cost_usd=float(cost) if cost else None,
            created_at=datetime.fromtimestamp(version.creation_timestamp / 1000, UTC), ratings=ratings,
            positive_share=ratings.get("positive", 0) / rated if rated else None,
        ))
    return rows


class DatasetVersionRow(BaseModel):
    name: str
    version: int
    spec: str = Field(description="name:vN, as --dataset and the models' dataset tag take it.")
    created_at: str = Field(description="When it was ingested (UTC, ISO 8601).")
    counts: dict[str, Any] = Field(description="Documents read, kept, in train and validation, dropped by reason.")
    content_hash: str = Field(description="Hash of its documents: equal hashes, equal data.")
    extends: str | None = Field(description="The version it adds documents to, if any.")
    path: str


def list_dataset_versions(config: GenloopConfig, name: str) -> list[DatasetVersionRow]:
    """The versions of dataset ``name``, oldest first; an invalid or unknown name is an error, not an
    empty list."""
    resolve_dataset(config.datasets_dir, check_name(name))
    return [DatasetVersionRow(name=version.name, version=version.version, spec=version.spec,
                              created_at=version.manifest["created_at"], counts=version.manifest["counts"],
                              content_hash=version.content_hash, extends=version.manifest.get("extends"),
                              path=str(version.path))
            for version in list_versions(config.datasets_dir, name)]
