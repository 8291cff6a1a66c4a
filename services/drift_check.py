"""`genloop drift`: gather the reference and the live window, run the drift check, record it.

Reference: the champion's training texts (its dataset's train split) cut to prompt-like prefixes,
or, when ``monitoring.drift_reference_window`` pins one, that window of the inference log.
Current: the inference log's last ``window`` of answered, non-shadow requests. The check itself
(Evidently) is ``monitoring.drift``; this module knows where things live: registry, datasets,
inference log, reports, MLflow.
"""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mlflow.entities import Metric
import pyarrow.parquet as pq

from monitoring.traffic import prompt_prefixes
from monitoring.drift import DriftResult, DriftSettings, detect_drift, read_latest
from services.config import GenloopConfig, UserInputError
from services.registry import Registry
from serving.inference_log import caller_prompts
from training.datasets import resolve_dataset
from training.evaluation import load_for_evaluation

logger = logging.getLogger(__name__)

def drift_dir(config: GenloopConfig) -> Path:
    return config.reports_dir / "drift"


def training_prefixes(config: GenloopConfig, dataset_spec: str, limit: int, seed: int) -> list[str]:
    """Up to ``limit`` texts of the dataset's train split, each cut to a prompt-like number of words."""
    dataset = resolve_dataset(config.datasets_dir, dataset_spec)
    texts = pq.read_table(dataset.train_path, columns=["text"]).column("text").to_pylist()
    texts = random.Random(seed).sample(texts, min(limit, len(texts)))
    return prompt_prefixes(texts, config.monitoring.drift_prefix_words, seed)


def run_drift_check(config: GenloopConfig, window: timedelta | None = None) -> DriftResult:
    """Compare the last ``window`` of traffic with the reference; report files, MLflow run, gauges."""
    settings = config.monitoring
    window = window or settings.drift_window
    registry = Registry(config)
    champion = registry.alias_version("champion")
    if champion is None:
        raise UserInputError("no champion: drift is measured against the model in service; promote one first")
    now = datetime.now(UTC)
    current = caller_prompts(config.inference_log_dir, since=now - window)
    current_label = f"inference log, last {window} (since {(now - window).isoformat(timespec='seconds')})"
    if settings.drift_reference_window is not None:
        start, end = settings.drift_reference_window
        reference = caller_prompts(config.inference_log_dir, since=start, until=end)
        reference_label = f"inference log, pinned window {start.isoformat()} – {end.isoformat()}"
    else:
        dataset = champion.tags.get("dataset")
        if not dataset:
            raise UserInputError(f"champion v{champion.version} has no dataset tag; pin "
                                 "monitoring.drift_reference_window instead")
        reference = training_prefixes(config, dataset, settings.drift_max_samples, seed=0)
        reference_label = f"training texts of v{champion.version} ({dataset}), cut to prompt-like prefixes"

    model, tokenizer = load_for_evaluation(registry.local_path(champion))
    result = detect_drift(
        reference, current, model=model, tokenizer=tokenizer, model_version=str(champion.version),
        reference_label=reference_label, current_label=current_label, out_dir=drift_dir(config),
        settings=DriftSettings(max_samples=settings.drift_max_samples, min_samples=settings.drift_min_samples,
                               num_threshold=settings.drift_threshold, drift_share=settings.drift_share),
    )
    _record(config, registry, result)
    return result


def _record(config: GenloopConfig, registry: Registry, result: DriftResult) -> None:
    """The report as an MLflow run of the experiment."""
    folder = drift_dir(config)
    client = registry.client
    run = client.create_run(registry.experiment_id(), run_name=result.id,
                            tags={"kind": "drift", "verdict": result.verdict, "model_version": result.model_version})
    values = {"drift_reference_samples": result.reference_samples, "drift_current_samples": result.current_samples,
              "drift_drifted_share": result.drifted_share,
              **{f"drift_score_{f.feature}": f.score for f in result.features}}
    stamp = int(result.created_at.timestamp() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(key, float(value), stamp, 0) for key, value in values.items()])
    for suffix in ("json", "html"):
        client.log_artifact(run.info.run_id, str(folder / f"{result.id}.{suffix}"), "drift")
    client.set_terminated(run.info.run_id, "FINISHED")
    logger.info("drift run %s logged as MLflow run %s", result.id, run.info.run_id)


def latest_drift(config: GenloopConfig) -> DriftResult | None:
    return read_latest(drift_dir(config))
