"""The cost report's MLflow metrics: written and read back through CostReport's fields alone."""

from __future__ import annotations

from genloop.training.config import CostConfig
from genloop.training.cost import CostReport, cost_report, logged_cost


def _report() -> CostReport:
    return cost_report(wall_seconds=120.0, train_seconds=100.0, device_type="cpu", device_count=2,
                       parameters=12_345_678, tokens_seen=3_000_000_000, timed_tokens=2_500_000_000,
                       prices=CostConfig(), initial_compute_flops=1e20)


def test_every_number_of_the_report_round_trips_through_the_run_metrics():
    report = _report()
    metrics = report.mlflow_metrics()
    assert all(isinstance(value, float) for value in metrics.values())
    logged = logged_cost({**metrics, "best_val_loss": 3.2})  # a run's other metrics are not the report's
    assert logged.model_dump() == report.model_dump(exclude={"device_type"})  # text lives in the artifact only
    assert isinstance(logged.tokens_seen, int) and logged.tokens_seen == 3_000_000_000


def test_what_a_run_did_not_log_reads_as_none():
    assert set(logged_cost({"best_val_loss": 3.2}).model_dump().values()) == {None}  # not trained by genloop
    wall_only = dict(list(_report().mlflow_metrics().items())[:1])
    partial = logged_cost(wall_only)
    assert partial.wall_seconds == 120.0 and partial.cost_usd is None
