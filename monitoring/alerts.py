"""Prometheus alert rules as code: the serving SLOs' multi-window, multi-burn-rate alerts (the Google SRE
workbook, "Alerting on SLOs") and the alerts on saturation, scrape targets, the scheduler, drift, the
inference log and retraining.

``python -m genloop.monitoring.alerts`` writes ``deploy/prometheus/alerts.yml``, the rule file
``deploy/prometheus/prometheus.yml`` loads. The SLO targets and thresholds are the settings below, so a
change to one rewrites every rule that depends on it; the tests fail when the committed file is stale,
when promtool finds it invalid or its unit tests (``alerts_test.yml``) fail, when an alert lacks a
unit test or a runbook section (``docs/runbook.md``), or when a rule names a metric nothing exports.

A burn rate is how fast errors spend the error budget: at 1 the budget lasts exactly the SLO period.
An alert fires when both a long window (the budget is really being spent) and a short one (it still
is, now) burn faster than the rate that would spend a given share of the budget in the long window:
2 % in an hour or 5 % in six hours pages, 10 % in a day or in three days opens a ticket.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, Field, field_validator

from genloop.monitoring.metrics import LATENCY_BUCKETS

OUT_FILE = Path(__file__).parents[1] / "deploy" / "prometheus" / "alerts.yml"
RUNBOOK = "docs/runbook.md"  # from the repository root; a published copy's URL can be given instead

# The routes that generate: what the SLOs are about (models, feedback and metrics are not).
GENERATION_ROUTES = 'route=~"completions|chat.completions"'
# Serve's own HTTP series, without its internal routes (/-/healthz, /-/routes).
SERVE_ROUTES = 'route!~"/-/.*"'


class SLOSettings(BaseModel):
    """The serving SLOs, each over ``period_days``: what the burn-rate alerts defend."""

    availability: float = Field(
        0.995, gt=0, lt=1, description="Share of completion and chat requests answered without a server error "
        "(5xx); a stream that fails after it began counts with its error's status.")
    ttft_seconds: float = Field(
        2.5, description="A first token later than this is slow. A bucket boundary of "
        "genloop_time_to_first_token_seconds, so the share of slow ones is counted, not estimated.")
    ttft_target: float = Field(
        0.99, gt=0, lt=1, description="Share of sequences (a choice of a prompt) whose first token comes within "
        "ttft_seconds.")
    period_days: int = Field(30, ge=1, description="The SLO period: the error budget is spent over this long.")

    @field_validator("ttft_seconds")
    @classmethod
    def _a_bucket_boundary(cls, value: float) -> float:
        if value not in LATENCY_BUCKETS:
            raise ValueError(f"must be a bucket boundary of the latency histograms: one of {LATENCY_BUCKETS}")
        return value


class AlertSettings(BaseModel):
    """What the alerts consider too much; the defaults are what deploy/prometheus/alerts.yml holds."""

    slo: SLOSettings = Field(default_factory=SLOSettings)
    shed_ratio: float = Field(
        0.05, gt=0, lt=1, description="Share of requests Serve's proxy answers 429 (shed by max_queued_requests or a "
        "replica's own limits) that is saturation.")
    queue_p95_seconds: float = Field(
        5.0, gt=0, description="p95 of the engines' queue time (arrival to first scheduling) that is saturation.")
    scheduler_late: timedelta = Field(
        timedelta(minutes=15), description="How far past a job's next run time the scheduler counts as not running "
        "(a run in progress moves the next run time on when it starts).")
    drift_stale: timedelta = Field(
        timedelta(hours=3), description="Age of the newest drift check that is stale while a drift job is scheduled "
        "(three runs of the default hourly scheduler.drift_interval: raise it with the interval).")
    runbook: str = Field(RUNBOOK, description="Where each alert's runbook_url points, before its #anchor.")


# (severity, long window, short window, share of the error budget spent in the long window): the SRE
# workbook's recommended parameters for a 30-day SLO, whatever the period (the burn rate scales).
BURN_WINDOWS = (("page", "1h", "5m", 0.02), ("page", "6h", "30m", 0.05),
                ("warning", "1d", "2h", 0.10), ("warning", "3d", "6h", 0.10))
_HOURS = {"5m": 5 / 60, "30m": 0.5, "1h": 1, "2h": 2, "6h": 6, "1d": 24, "3d": 72}


def _seconds(value: timedelta) -> int:
    return int(value.total_seconds())


def _slo_rules(name: str, ratio: Callable[[str], str], budget: float, period_days: int, what: str, runbook: str,
               summary: str, description: str) -> tuple[list[dict], list[dict]]:
    """Recording rules of the bad-event ``ratio`` (PromQL, given a window) per window, and a paging and
    a ticket alert on their burn rates."""
    record = f"genloop:{name}:ratio_rate{{window}}"
    windows = sorted({w for _, long, short, _ in BURN_WINDOWS for w in (long, short)}, key=_HOURS.__getitem__)
    records = [{"record": record.format(window=w), "expr": ratio(w)} for w in windows]
    alerts = []
    for severity, speed in (("page", "fast"), ("warning", "slow")):
        conditions = []
        for level, long, short, share in BURN_WINDOWS:
            if level != severity:
                continue
            threshold = f"{round(share * period_days * 24 / _HOURS[long], 4):g} * {budget:g}"
            conditions.append(f"(\n  {record.format(window=long)} > {threshold}\n"
                              f"  and {record.format(window=short)} > {threshold}\n)")
        alerts.append(_alert(
            f"Genloop{what}BudgetBurn{speed.title()}", "\nor\n".join(conditions) + "\n", severity,
            f"{summary} {speed}", f"{{{{ $value | humanizePercentage }}}} {description} over the long window; the "
            f"budget is {budget:.2%}.", runbook, "2m" if severity == "page" else "15m"))
    return records, alerts


def _alert(name: str, expr: str, severity: str, summary: str, description: str, runbook: str,
           wait: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if wait is not None:
        rule["for"] = wait
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description, "runbook_url": f"{runbook}#{name.lower()}"}
    return rule


def rules(settings: AlertSettings | None = None) -> dict[str, Any]:
    """The rule file as data, in Prometheus's format (``settings``: the defaults unless given)."""
    settings = settings or AlertSettings()
    slo, runbook = settings.slo, settings.runbook
    error_records, error_alerts = _slo_rules(
        "slo_errors_per_request",
        lambda window: f'sum(rate(genloop_requests_total{{{GENERATION_ROUTES}, status=~"5.."}}[{window}]))\n'
                       f"/\nsum(rate(genloop_requests_total{{{GENERATION_ROUTES}}}[{window}]))\n",
        round(1 - slo.availability, 6), slo.period_days, "Error", runbook,
        "Server errors burn the availability error budget", "of completion and chat requests failed")
    le = floatToGoString(slo.ttft_seconds)  # as prometheus_client writes the bucket's label
    first_tokens = f'genloop_time_to_first_token_seconds_bucket{{{GENERATION_ROUTES}, le="{le}"}}'
    slow_records, slow_alerts = _slo_rules(
        "slo_slow_first_tokens_per_sequence",
        lambda window: f"1 - (\n  sum(rate({first_tokens}[{window}]))\n  /\n"
                       f"  sum(rate(genloop_time_to_first_token_seconds_count{{{GENERATION_ROUTES}}}[{window}]))\n)\n",
        round(1 - slo.ttft_target, 6), slo.period_days, "TTFT", runbook,
        "Slow first tokens burn the latency error budget", f"of first tokens took over {slo.ttft_seconds:g} s")
    saturation = [
        _alert("GenloopRequestsShed",
               f'sum(rate(ray_serve_num_http_error_requests_total{{{SERVE_ROUTES}, error_code="429"}}[5m]))\n'
               f"/\nsum(rate(ray_serve_num_http_requests_total{{{SERVE_ROUTES}}}[5m]))\n> {settings.shed_ratio:g}\n",
               "warning", "Serve sheds requests with 429",
               "{{ $value | humanizePercentage }} of requests were answered 429 (Too Many Requests) over 5 minutes.",
               runbook, "10m"),
        _alert("GenloopEngineQueueing",
               "histogram_quantile(0.95,\n  sum by (le, model_version) "
               "(rate(genloop_request_queue_time_seconds_bucket[5m]))\n)\n"
               f"> {settings.queue_p95_seconds:g}\n",
               "warning", "Requests wait long in the engines before they are scheduled",
               "p95 queue time of v{{ $labels.model_version }} is {{ $value | humanizeDuration }}.", runbook, "10m"),
    ]
    health = [
        _alert("GenloopTargetDown", "up == 0\n", "warning", "Prometheus cannot scrape a target",
               "{{ $labels.job }} target {{ $labels.instance }} has been down for 5 minutes.", runbook, "5m"),
        _alert("GenloopNoChampionLoaded", "absent(genloop_model_info == 1)\n", "page", "No replica serves a model",
               "No genloop replica has reported a loaded model for 5 minutes.", runbook, "5m"),
        _alert("GenloopInferenceLogDropping",
               "sum by (replica) (increase(genloop_inference_log_dropped_total[10m])) > 0\n", "warning",
               "A replica drops inference-log records",
               "Replica {{ $labels.replica }} dropped {{ $value | humanize }} records in 10 minutes: its log buffer "
               "is full.", runbook),
    ]
    control = [
        _alert("GenloopSchedulerNotRunning",
               f"time() - genloop_scheduler_next_run_timestamp_seconds > {_seconds(settings.scheduler_late)}\n",
               "warning", "A scheduled job's run time has passed without a run",
               "Job {{ $labels.job }} was due {{ $value | humanizeDuration }} ago: the scheduler is not running.",
               runbook, "5m"),
        _alert("GenloopDriftCheckStale",
               f"(time() - genloop_drift_last_run_timestamp_seconds > {_seconds(settings.drift_stale)})\n"
               'and on () count(genloop_scheduler_next_run_timestamp_seconds{job="drift"})\n',
               "warning", "The drift check is stale",
               "The newest drift check is {{ $value | humanizeDuration }} old although a drift job is scheduled.",
               runbook, "10m"),
        _alert("GenloopDriftDetected", 'genloop_drift_detected{feature="dataset"} == 1\n', "warning",
               "Live prompts drifted from the champion's training data",
               "The last drift check found drift; see reports/drift/ (genloop drift).", runbook, "1m"),
        _alert("GenloopRetrainingFailing",
               'increase(genloop_training_runs_total{outcome="failed"}[6h]) > 0\n'
               'or increase(genloop_scheduler_job_runs_total{outcome="failed"}[6h]) > 0\n',
               "warning", "Retraining failed in the last 6 hours",
               "A training run or scheduler job failed; the champion stays as it was.", runbook),
        _alert("GenloopChampionStale", "time() - genloop_champion_promoted_timestamp_seconds > 14 * 86400\n", "info",
               "The champion is older than 14 days",
               "The champion was promoted {{ $value | humanizeDuration }} ago; is retraining running?", runbook, "1h"),
    ]
    return {"groups": [
        {"name": "genloop-slo", "rules": [*error_records, *slow_records, *error_alerts, *slow_alerts]},
        {"name": "genloop-serving", "rules": [*saturation, *health]},
        {"name": "genloop-control-plane", "rules": control},
    ]}


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL) as literal blocks, so the file reads like a hand-written one."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render(settings: AlertSettings | None = None) -> str:
    """The rule file exactly as written to disk."""
    return ("# Generated by `python -m genloop.monitoring.alerts` from monitoring/alerts.py (the SLOs and thresholds\n"
            "# are settings there): edit those and regenerate, not this file. Unit tests: alerts_test.yml.\n"
            + yaml.dump(rules(settings), Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m genloop.monitoring.alerts", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=OUT_FILE, help="rule file to write")
    parser.add_argument("--runbook", default=RUNBOOK, help="runbook_url before its #anchor, e.g. its published URL")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(f".{args.out.name}.tmp")
    temporary.write_text(render(AlertSettings(runbook=args.runbook)), encoding="utf-8")
    temporary.replace(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
