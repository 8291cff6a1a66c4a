"""One retraining round, as the scheduler runs it: new data → replay mix → budgeted warm start → gate.

The round is the loop of DESIGN.md in one call. It ingests the configured sources (a new dataset
version only when their content changed) and the files landed in ``scheduler.incoming``, then
counts the documents of the newest version that the champion's lineage never saw. Fewer than
``scheduler.min_new_documents`` and the round is skipped, so a cron schedule (or persistent
drift) costs nothing without new data. Otherwise it builds a training mix (``training.replay``):
the new documents plus ``replay_fraction`` of earlier ones, because a warm start on new data alone
forgets the old domain and the gate refuses it. The warm start runs on a budget, a share of the
lineage's from-scratch compute (``retrain_budget``), in small steps (``retrain_micro_batch_size``);
every evaluation asks the gate's question on held-out texts of the new data and of the lineage
(``services.selection``), which picks the checkpoint the gate is handed and may stop it sooner.
A mix already trained from this champion and refused is not trained again. A refused or failed
round leaves the champion as it was: training only registers a version, and only the gate moves
the alias.

With no champion the round trains one from scratch on everything there is. ``genloop up``'s
first round on empty state (reason ``BOOTSTRAP``) with no sources configured takes the built-in
corpus (``BOOTSTRAP_SOURCES``), so that it ends up serving; any other round without data fails,
saying so, rather than train on text nobody chose.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.evaluation_report import EvaluationReport
from genloop.services.lifecycle import PromotionRefused, promote
from genloop.services.registry import Registry
from genloop.services.search import search_mixes, search_retrain, trial_plans
from genloop.services.selection import retrain_selection
from genloop.services.training_run import TrainingRun, initial_compute, train
from genloop.serving.inference_log import rated_completions
from genloop.training.config import TrainConfig
from genloop.training.dataset_store import DatasetVersion, list_versions, resolve_dataset
from genloop.training.datasets import ingest
from genloop.training.errors import UserInputError
from genloop.training.incoming import ingest_incoming
from genloop.training.replay import new_documents
from genloop.training.sources import Source

logger = logging.getLogger(__name__)

RetrainOutcome = Literal["promoted", "rejected", "skipped"]
BOOTSTRAP = "bootstrap"  # the reason of `genloop up`'s first round on empty state
BOOTSTRAP_SOURCES = ["builtin:python-docs"]  # what its first model learns when no sources are configured


class RetrainResult(BaseModel):
    outcome: RetrainOutcome
    detail: str = Field(description="What happened, in a sentence for the job history.")
    dataset: str | None = Field(None, description="Dataset version trained on, as name:vN.")
    version: str | None = Field(None, description="Registered candidate version, when one was trained.")
    run: TrainingRun | None = Field(None, description="The training run (metrics, cost), when one was trained.")
    report: EvaluationReport | None = Field(None, description="The gate's report, when it judged the candidate.")


def ingest_new_data(config: GenloopConfig, sources: bool = True, bootstrap: bool = False) -> None:
    """Ingest ``scheduler.sources`` (unless ``sources`` is False), the settled files of
    ``scheduler.incoming`` and, with ``scheduler.feedback_min_rating``, the well-rated answers into
    ``scheduler.dataset``. For a ``bootstrap`` with no sources configured and the dataset still
    empty, the sources are ``BOOTSTRAP_SOURCES``."""
    settings = config.scheduler
    chosen = settings.sources
    if bootstrap and sources and not chosen and not list_versions(config.datasets_dir, settings.dataset):
        chosen = BOOTSTRAP_SOURCES
    if sources and chosen:
        connect(config.ray)  # before ingest: Ray Data would otherwise start a Ray of its own choosing
        result = ingest(chosen, settings.dataset, config.data, config.datasets_dir)
        logger.info("%s %s", result.version.spec, "ingested" if result.created else "unchanged")
    if settings.incoming is not None:
        connect(config.ray)
        landed = ingest_incoming(settings.incoming, settings.dataset, config.data, config.datasets_dir,
                                 settings.incoming_settle_s)
        if landed is not None:
            logger.info("%s ingested from %s", landed.version.spec, settings.incoming)
    if settings.feedback_min_rating is not None:
        ingest_feedback(config)


def ingest_feedback(config: GenloopConfig) -> None:
    """Answers callers rated at least ``scheduler.feedback_min_rating`` join ``scheduler.dataset`` as
    documents (prompt + completion), on top of its latest version. Handed to Ray Data as bytes, like
    landed files: the inference log is read here, on the driver. Ratings already ingested are
    duplicates, so a version is only made when new ones came in."""
    settings = config.scheduler
    texts = rated_completions(config.inference_log_dir, settings.feedback_min_rating)
    if not texts:
        return
    connect(config.ray)
    payload = "".join(json.dumps({config.data.text_field: text}) + "\n" for text in texts).encode()
    source = Source(spec=f"feedback:rating>={settings.feedback_min_rating}", licence="callers of this service",
                    files=("rated-completions.jsonl",), payload=(payload,))
    versions = list_versions(config.datasets_dir, settings.dataset)
    result = ingest([source], settings.dataset, config.data, config.datasets_dir,
                    extend=versions[-1] if versions else None)
    logger.info("%s %s with %d rated completions", result.version.spec,
                "ingested" if result.created else "unchanged", len(texts))


def unseen(config: GenloopConfig) -> tuple[DatasetVersion, list[DatasetVersion], int]:
    """The newest version of ``scheduler.dataset``, the datasets the champion's lineage trained on,
    and how many train documents of the first none of the second holds."""
    settings = config.scheduler
    versions = list_versions(config.datasets_dir, settings.dataset)
    if not versions:
        raise UserInputError(f"dataset {settings.dataset!r} has no version and scheduler.sources and "
                             "scheduler.incoming bring none: nothing to train on")
    registry = Registry(config)
    champion = registry.alias_version("champion")
    seen = [resolve_dataset(config.datasets_dir, spec) for spec in registry.lineage_datasets(champion)] \
        if champion is not None else []
    return versions[-1], seen, new_documents(versions[-1], seen)


def retrain_settings(config: GenloopConfig, registry: Registry) -> TrainConfig:
    """The warm start's schedule: at most ``retrain_budget`` of the lineage's from-scratch compute, in
    steps of ``retrain_micro_batch_size`` at ``retrain_learning_rate_scale`` × the peak learning rate,
    with a short warm-up, validated often enough to stop early."""
    train_settings, settings = config.train, config.scheduler
    tokens_per_step = (train_settings.block_size * settings.retrain_micro_batch_size
                       * train_settings.grad_accum_steps * train_settings.num_workers)
    initial = initial_compute(registry, registry.resolve("champion"))
    if initial is None and settings.retrain_budget <= 1:
        raise UserInputError("the champion's lineage logged no training compute: give scheduler.retrain_budget "
                             "as a number of steps (> 1)")
    steps = min(train_settings.max_steps, settings.budget_steps(initial[0] if initial else 0, tokens_per_step))
    return train_settings.model_copy(update={
        "learning_rate": train_settings.learning_rate * settings.retrain_learning_rate_scale,
        "micro_batch_size": settings.retrain_micro_batch_size,
        "max_steps": steps,
        "warmup_steps": min(train_settings.warmup_steps, steps // 10),
        "eval_every": min(train_settings.eval_every, max(1, steps // 4)),
    })


def _no_stages(stage: str, detail: str = "", mlflow_run_id: str | None = None, report: str | None = None) -> None:
    pass


def retrain(config: GenloopConfig, reason: str, show_progress: bool = False, actor: str = "scheduler",
            stage: Callable[..., None] = _no_stages) -> RetrainResult:
    """Run one round; ``actor`` and ``reason`` (cron, drift, new data, manual) go into the promotion's
    audit trail. ``stage(name, detail, mlflow_run_id=…, report=…)`` is told as the round moves on
    (the scheduler's job history keeps it)."""
    settings = config.scheduler
    stage("ingest")
    ingest_new_data(config, bootstrap=reason == BOOTSTRAP)
    fresh, seen, count = unseen(config)
    registry = Registry(config)
    champion = registry.alias_version("champion")
    plans, mixes = [], {}
    if champion is None:  # the first model: from scratch on everything there is
        dataset, base, train_settings = fresh.spec, None, None
    elif count < settings.min_new_documents:
        return RetrainResult(outcome="skipped", dataset=fresh.spec,
                             detail=f"{count} new documents in {fresh.spec} since champion "
                                    f"v{champion.version}'s data, fewer than {settings.min_new_documents}")
    else:
        train_settings = retrain_settings(config, registry)
        plans = trial_plans(settings.search, settings.replay_fraction, train_settings.learning_rate, config.train.seed)
        mixes = search_mixes(config, fresh, seen, plans)
        mix = mixes[settings.replay_fraction]
        dataset, base = mix.spec, "champion"
    parent = str(champion.version) if champion is not None else ""
    trained_on = {m.spec for m in mixes.values()} | {dataset}
    tried = [v for v in registry.versions() if v.tags.get("dataset") in trained_on
             and v.tags.get("parent_version", "") == parent]
    if tried:  # the gate already judged this very round; training it again would only repeat that
        return RetrainResult(outcome="skipped", dataset=dataset, version=str(tried[-1].version),
                             detail=f"v{tried[-1].version} was already trained on {dataset} from "
                                    f"{'v' + parent if parent else 'scratch'} and is not the champion")
    selection = None
    if train_settings is not None:  # a warm start of the champion
        selection = retrain_selection(config, dataset, [v.spec for v in seen])
        counts = mix.manifest["counts"]
        logger.info("retrain (%s) on %s: %d new + %d replayed documents, at most %d steps; checkpoints scored "
                    "by the gate's rules, weights %s", reason, dataset, counts["new"], counts["replay"],
                    train_settings.max_steps, selection.weights)
    start = f"from v{champion.version}" if champion is not None else "from scratch"
    stage("prepare", f"{dataset}, {start}")  # tokenizer or base model, until the MLflow run exists
    on_run = lambda run_id: stage("train", f"{dataset}, {start}", mlflow_run_id=run_id)  # noqa: E731
    if selection is not None and len(plans) > 1:
        run = search_retrain(config, plans, mixes, train_settings, selection, show_progress, on_run)
        dataset = run.dataset  # the mix of the trial that won
    else:
        run = train(config, dataset, base=base, show_progress=show_progress, settings=train_settings,
                    on_run=on_run, selection=selection)
    if run.selection:
        logger.info("v%s kept at %s", run.version, run.selection)
    stage("gate", f"v{run.version}", mlflow_run_id=run.run_id)
    try:
        report = promote(config, run.version, actor=actor, reason=f"retrain ({reason}) on {dataset}")
    except PromotionRefused as refused:
        result = RetrainResult(outcome="rejected", dataset=dataset, version=run.version, run=run,
                               report=refused.report, detail=f"v{run.version} refused by the gate: {refused}")
    else:
        result = RetrainResult(outcome="promoted", dataset=dataset, version=run.version, run=run, report=report,
                               detail=f"v{run.version} trained on {dataset} is the champion")
    stage(result.outcome, f"v{run.version}", mlflow_run_id=run.run_id,
          report=f"evaluations/{result.report.id}.html" if result.report is not None else None)
    return result
