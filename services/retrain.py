"""One retraining round, as the scheduler runs it: new data → warm start from the champion → gate.

The round is the loop of DESIGN.md in one call: ingest the configured sources (a new dataset
version only when their content changed), train from the champion (from scratch when there is
none) on the newest version, and promote through the evaluation gate. It does nothing when the
champion was already trained on that very dataset version, or a candidate trained on it from this
champion was refused, so a cron schedule (or persistent drift) costs nothing without new data. A
refused or failed round leaves the champion as it was: training only registers a version, and only
the gate moves the alias.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, Field

from services.cluster import connect
from services.config import GenloopConfig, UserInputError
from services.gate import EvaluationReport
from services.lifecycle import PromotionRefused, promote
from services.registry import Registry
from services.training_run import TrainingRun, train
from training.datasets import ingest, list_versions

logger = logging.getLogger(__name__)

RetrainOutcome = Literal["promoted", "rejected", "skipped"]


class RetrainResult(BaseModel):
    outcome: RetrainOutcome
    detail: str = Field(description="What happened, in a sentence for the job history.")
    dataset: str | None = Field(None, description="Dataset version trained on, as name:vN.")
    version: str | None = Field(None, description="Registered candidate version, when one was trained.")
    run: TrainingRun | None = Field(None, description="The training run (metrics, cost), when one was trained.")
    report: EvaluationReport | None = Field(None, description="The gate's report, when it judged the candidate.")


def retrain(config: GenloopConfig, reason: str, show_progress: bool = False, actor: str = "scheduler") -> RetrainResult:
    """Run one round; ``actor`` and ``reason`` (cron, drift, manual) go into the promotion's audit trail."""
    settings = config.scheduler
    if not settings.sources and not list_versions(config.datasets_dir, settings.dataset):
        raise UserInputError(f"dataset {settings.dataset!r} has no version and scheduler.sources is empty: "
                             "nothing to train on")
    if settings.sources:
        connect(config.ray)  # before ingest: Ray Data would otherwise start a Ray of its own choosing
        result = ingest(settings.sources, settings.dataset, config.data, config.datasets_dir)
        logger.info("retrain (%s): %s %s", reason, result.version.spec, "ingested" if result.created else "unchanged")
    dataset = list_versions(config.datasets_dir, settings.dataset)[-1].spec

    registry = Registry(config)
    champion = registry.alias_version("champion")
    if champion is not None and champion.tags.get("dataset") == dataset:
        return RetrainResult(outcome="skipped", dataset=dataset,
                             detail=f"no new data: champion v{champion.version} was trained on {dataset}")
    parent = str(champion.version) if champion is not None else ""
    tried = [v for v in registry.versions() if v.tags.get("dataset") == dataset
             and v.tags.get("parent_version", "") == parent]
    if tried:  # the gate already judged this very round; training it again would only repeat that
        return RetrainResult(outcome="skipped", dataset=dataset, version=str(tried[-1].version),
                             detail=f"v{tried[-1].version} was already trained on {dataset} from "
                                    f"{'v' + parent if parent else 'scratch'} and is not the champion")
    run = train(config, dataset, base="champion" if champion is not None else None, show_progress=show_progress)
    try:
        report = promote(config, run.version, actor=actor, reason=f"retrain ({reason}) on {dataset}")
    except PromotionRefused as refused:
        return RetrainResult(outcome="rejected", dataset=dataset, version=run.version, run=run,
                             report=refused.report, detail=f"v{run.version} refused by the gate: {refused}")
    return RetrainResult(outcome="promoted", dataset=dataset, version=run.version, run=run, report=report,
                         detail=f"v{run.version} trained on {dataset} is the champion")
