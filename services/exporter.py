"""The control plane's metrics endpoint: MLflow, the audit log, drift reports, the scheduler's job
history and callers' feedback in the inference log as Prometheus series.

Training runs, gates, promotions and drift checks happen in short-lived commands and in the
scheduler; counting them in-process would lose whatever a finished command counted. Their
records are durable, so the exporter reads them at scrape time (cached for ``ttl`` seconds: a
scrape must stay cheap) and ``monitoring.metrics.ControlPlaneCollector`` reports them. It runs
inside ``genloop serve`` and announces itself to Prometheus like the replicas do.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from genloop.monitoring.drift import publish
from genloop.monitoring.metrics import (
    DRIFT_DETECTED,
    DRIFT_LAST_RUN,
    DRIFT_SAMPLES,
    DRIFT_SCORE,
    DRIFT_THRESHOLD,
    FEEDBACK_RATINGS,
    MODEL_SWAPS,
    ControlPlaneCollector,
    ControlPlaneState,
    VersionState,
)
from genloop.monitoring.scrape_targets import ScrapeTarget
from genloop.services.audit import AuditLog
from genloop.services.config import GenloopConfig
from genloop.services.drift_check import latest_drift
from genloop.services.evaluation_report import EvaluationReport
from genloop.services.registry import Registry
from genloop.services.scheduler import JobHistory
from genloop.serving.inference_log import feedback_by_version
from genloop.training.cost import logged_cost

logger = logging.getLogger(__name__)


def read_state(config: GenloopConfig) -> ControlPlaneState:
    """Everything the control plane has recorded, as one snapshot."""
    registry = Registry(config)
    runs = registry.client.search_runs([registry.experiment_id()], max_results=5000)
    training = [run for run in runs if run.data.tags.get("kind") != "drift"]
    outcomes: dict[str, int] = {}
    for run in training:
        outcome = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}.get(run.info.status)
        if outcome:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    by_run = {run.info.run_id: run for run in training}

    versions, last_retrain = [], None
    evaluations = _latest_evaluations(config)
    for version in registry.versions():
        run = by_run.get(version.run_id or "")
        metrics = run.data.metrics if run else {}
        if run is not None and run.info.end_time:
            last_retrain = max(last_retrain or 0.0, run.info.end_time / 1000)
        cost = logged_cost(metrics)
        versions.append(VersionState(
            version=str(version.version), training_seconds=cost.wall_seconds, cost_usd=cost.cost_usd,
            energy_kwh=cost.energy_kwh, best_val_loss=metrics.get("best_val_loss"),
            evaluation=evaluations.get(str(version.version), {}),
        ))

    changes: dict[str, dict[str, int]] = {}
    champion_since = None
    champion = registry.alias_version("champion")
    for entry in AuditLog(config.state_db).history():
        counts = changes.setdefault(entry.action, {})
        counts[entry.outcome] = counts.get(entry.outcome, 0) + 1
        if champion is not None and entry.to_version == str(champion.version) and entry.outcome in (
                "promoted", "rolled-back"):
            champion_since = max(champion_since or 0.0, datetime.fromisoformat(entry.at).timestamp())
    return ControlPlaneState(
        training_runs=outcomes, last_successful_retrain=last_retrain, versions=versions,
        champion=str(champion.version) if champion else None, champion_since=champion_since, alias_changes=changes,
        jobs=_job_history(config.scheduler_db).summary(),
        feedback={version: {FEEDBACK_RATINGS[rating]: count for rating, count in counts.items()}
                  for version, counts in feedback_by_version(config.inference_log_dir).items()},
    )


@functools.cache
def _job_history(url: str) -> JobHistory:
    """One engine per job store for the exporter's life: a scrape must stay cheap."""
    return JobHistory(url)


def _latest_evaluations(config: GenloopConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Candidate version → set → gate metric → value, from each version's newest gate report."""
    folder = config.reports_dir / "evaluations"
    latest: dict[str, EvaluationReport] = {}
    for path in sorted(Path(folder).glob("*.json")) if folder.exists() else []:
        report = EvaluationReport.model_validate_json(path.read_text(encoding="utf-8"))
        version = report.candidate.version
        if version not in latest or report.created_at >= latest[version].created_at:
            latest[version] = report
    return {version: {set_name: roles["candidate"].compared() for set_name, roles in report.metrics.items()}
            for version, report in latest.items()}


class _Cached:
    def __init__(self, config: GenloopConfig, ttl: float):
        self.config, self.ttl = config, ttl
        self._state, self._at, self._lock = ControlPlaneState(), 0.0, threading.Lock()

    def __call__(self) -> ControlPlaneState:
        with self._lock:
            if time.monotonic() - self._at > self.ttl:
                try:
                    self._state = read_state(self.config)
                    drift = latest_drift(self.config)
                    if drift is not None:
                        publish(drift)
                except Exception:  # a scrape must answer; the last good snapshot stands
                    logger.exception("reading the control plane's records failed")
                self._at = time.monotonic()
            return self._state


def start_exporter(config: GenloopConfig, ttl: float = 10.0) -> ScrapeTarget:
    """Serve the control plane's metrics (records, drift gauges, rollouts) and announce them to Prometheus."""
    registry = CollectorRegistry()
    registry.register(ControlPlaneCollector(_Cached(config, ttl)))
    for instrument in (DRIFT_SCORE, DRIFT_THRESHOLD, DRIFT_DETECTED, DRIFT_SAMPLES, DRIFT_LAST_RUN, MODEL_SWAPS):
        registry.register(instrument)
    return ScrapeTarget(config.scrape_targets_dir, "control-plane", labels={"component": "control-plane"},
                        registry=registry, port=config.monitoring.exporter_port)
