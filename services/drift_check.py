"""`genloop drift`: gather the reference and the live window, run the drift check, record it.

Reference: text of the champion's domain cut to prompt-like prefixes, or, when
``monitoring.drift_reference_window`` pins one, that window of the inference log. The text is the
held-out (validation) split of every dataset in the champion's lineage when it holds at least
``drift_min_samples`` texts: the champion never trained on it, so its surprise and its tokenizer's
byte fallback on it are what they are on unseen text of the same domain, where on its own training
text they are lower and same-domain traffic looked like drift. With less held-out text, the
champion's training texts stand in.
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

from genloop.monitoring.drift import DriftResult, detect_drift, read_latest
from genloop.monitoring.traffic import prompt_prefixes
from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.serving.inference_log import caller_prompts
from genloop.training.cleaning import TRAIN
from genloop.training.dataset_store import resolve_dataset
from genloop.training.errors import UserInputError
from genloop.training.evaluation import load_for_evaluation

logger = logging.getLogger(__name__)

def drift_dir(config: GenloopConfig) -> Path:
    return config.reports_dir / "drift"


def reference_prefixes(config: GenloopConfig, registry: Registry, champion, limit: int,
                       seed: int) -> tuple[list[str], str]:
    """Up to ``limit`` texts of the champion's domain (see the module docstring), cut to prompt-like
    numbers of words, and where they came from."""
    specs = registry.lineage_datasets(champion)
    if not specs:
        raise UserInputError(f"champion v{champion.version} has no dataset tag; pin "
                             "monitoring.drift_reference_window instead")
    datasets = [resolve_dataset(config.datasets_dir, spec) for spec in specs]
    texts = [text for dataset in datasets for text in dataset.texts()]
    label = f"held-out texts of v{champion.version}'s lineage ({', '.join(specs)})"
    if len(texts) < config.monitoring.drift_min_samples:
        texts = datasets[0].texts(TRAIN)
        label = f"training texts of v{champion.version} ({specs[0]}; too little held-out text)"
    texts = random.Random(seed).sample(texts, min(limit, len(texts)))
    return prompt_prefixes(texts, config.monitoring.drift_prefix_words, seed), label + ", cut to prompt-like prefixes"


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
        reference, reference_label = reference_prefixes(config, registry, champion, settings.drift_max_samples,
                                                        seed=0)

    model, tokenizer = load_for_evaluation(registry.local_path(champion))
    result = detect_drift(
        reference, current, model=model, tokenizer=tokenizer, model_version=str(champion.version),
        reference_label=reference_label, current_label=current_label, out_dir=drift_dir(config),
        settings=settings.drift_settings(),
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
