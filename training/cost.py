"""Cost and energy report of a training run: what the run consumed, in money, energy and efficiency.

Model FLOPs utilisation uses the standard 6·N·T estimate of training FLOPs (forward + backward
for N parameters over T tokens, PaLM appendix B), divided by what the devices could have done
in the time spent training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, create_model

from genloop.training.config import CostConfig

_METRIC_PREFIX = "cost_"  # a field's MLflow run metric is cost_<field>

# Model-version tag with the run's price in $, so a list of versions shows it without reading each run.
COST_USD_TAG = "cost_usd"


class CostReport(BaseModel):
    wall_seconds: float = Field(description="Whole run, start-up and checkpointing included.")
    train_seconds: float = Field(
        description="Time inside optimizer steps on rank 0, less the first step after each (re)start."
    )
    device_type: str = Field(description="cpu or cuda.")
    device_count: int = Field(description="Training workers (one device each).")
    device_hours: float = Field(description="wall_seconds × device_count / 3600.")
    price_per_device_hour: float = Field(description="$ per device-hour used for the price.")
    cost_usd: float = Field(description="device_hours × price_per_device_hour.")
    watts_per_device: float = Field(description="Assumed draw per device.")
    energy_kwh: float = Field(description="device_hours × watts_per_device / 1000.")
    parameters: int = Field(description="Trained model's parameter count.")
    tokens_seen: int = Field(description="Training tokens over all workers.")
    tokens_per_second: float = Field(description="Tokens of the timed steps / train_seconds, over all workers.")
    peak_flops_per_device: float = Field(description="Peak FLOP/s per device assumed for MFU.")
    mfu: float = Field(description="6·parameters·tokens_per_second / (peak · device_count).")
    compute_flops: float = Field(description="Training compute, 6·parameters·tokens_seen.")
    initial_compute_flops: float = Field(
        description="Compute of the from-scratch run this model's lineage started with (its own, from scratch)."
    )
    compute_ratio: float = Field(description="compute_flops / initial_compute_flops: what a retrain cost.")

    def mlflow_metrics(self) -> dict[str, float]:
        """The report's numbers as MLflow run metrics, which ``logged_cost`` reads back. The whole
        report, device type included, is logged as the run's cost_report.json artifact."""
        return {_METRIC_PREFIX + name: float(getattr(self, name)) for name in LoggedCost.model_fields}


# What a run's MLflow metrics hold of its CostReport: the numeric fields, each None where the run logged
# none (a model registered from outside genloop logs none). Derived from CostReport, so the two cannot drift.
_LOGGED_FIELDS: dict[str, Any] = {name: (field.annotation | None, None)
                                   for name, field in CostReport.model_fields.items()
                                   if field.annotation in (int, float)}
LoggedCost = create_model("LoggedCost", **_LOGGED_FIELDS)


def logged_cost(metrics: Mapping[str, float]) -> LoggedCost:
    """The cost report in a run's metrics (``run.data.metrics``), as ``CostReport.mlflow_metrics`` logged it."""
    return LoggedCost(**{name: metrics[_METRIC_PREFIX + name] for name in LoggedCost.model_fields
                         if _METRIC_PREFIX + name in metrics})


def cost_report(
    *,
    wall_seconds: float,
    train_seconds: float,
    device_type: str,
    device_count: int,
    parameters: int,
    tokens_seen: int,
    timed_tokens: int,
    prices: CostConfig,
    initial_compute_flops: float | None = None,
) -> CostReport:
    """``initial_compute_flops`` is the lineage's from-scratch compute; None means this run is it."""
    device_hours = wall_seconds * device_count / 3600
    price = prices.price_per_device_hour.get(device_type, 0.0)
    watts = prices.watts_per_device.get(device_type, 0.0)
    peak = prices.peak_flops_per_device.get(device_type, 0.0)
    tokens_per_second = timed_tokens / max(train_seconds, 1e-9)
    flops = 6.0 * parameters * tokens_seen
    initial = initial_compute_flops or flops
    return CostReport(
        wall_seconds=wall_seconds,
        train_seconds=train_seconds,
        device_type=device_type,
        device_count=device_count,
        device_hours=device_hours,
        price_per_device_hour=price,
        cost_usd=device_hours * price,
        watts_per_device=watts,
        energy_kwh=device_hours * watts / 1000,
        parameters=parameters,
        tokens_seen=tokens_seen,
        tokens_per_second=tokens_per_second,
        peak_flops_per_device=peak,
        mfu=6 * parameters * tokens_per_second / (peak * device_count) if peak else 0.0,
        compute_flops=flops,
        initial_compute_flops=initial,
        compute_ratio=flops / initial if initial else 0.0,
    )
