"""Grafana dashboards as code (grafana-foundation-sdk): serving, model quality & drift, training & cost,
scheduler.

``python -m genloop.monitoring.dashboards`` writes them to ``deploy/grafana/dashboards/*.json``, the folder
Grafana's provisioning (``deploy/grafana/provisioning/``) loads. The tests regenerate them and fail
when the committed JSON is stale or a query names a metric ``monitoring.metrics`` does not define.
Every series is summed over replicas (each scraped on its own, see ``monitoring.scrape_targets``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions
from grafana_foundation_sdk.builders.dashboard import AnnotationQuery, Dashboard, DatasourceVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

OUT_DIR = Path(__file__).parents[1] / "deploy" / "grafana" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _quantiles(metric: str, by: str = "") -> list[prometheus.Dataquery]:
    group = f"le{', ' + by if by else ''}"
    return [_query(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
                   f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""), ref)
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))]


class _Layout:
    """Assigns panel ids and packs panels into rows of 24 columns."""

    def __init__(self, title: str, uid: str, description: str):
        self.dashboard = (
            Dashboard(title).uid(uid).description(description).tags(["genloop"]).refresh("30s")
            .time("now-6h", "now").timezone("browser")
            .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        )
        self.next_id = 1

    def row(self, title: str) -> _Layout:
        self.dashboard.with_row(Row(title).id(self.next_id))
        self.next_id += 1
        return self

    def panel(self, panel, width: int = 12, height: int = 8) -> _Layout:
        self.dashboard.with_panel(panel.id(self.next_id).datasource(DATASOURCE).span(width).height(height))
        self.next_id += 1
        return self


def _timeseries(title: str, unit: str, *queries: prometheus.Dataquery, description: str = "") -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).unit(unit)
    for query in queries:
        panel = panel.with_target(query)
    return panel


def _stat(title: str, unit: str, query: prometheus.Dataquery, description: str = "") -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit).with_target(query)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def _thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(value=v, color=c) for v, c in steps])


def serving() -> Dashboard:
    layout = _Layout("genloop · serving", "genloop-serving", "The OpenAI-compatible endpoint, all replicas summed.")
    layout.row("Traffic")
    layout.panel(_timeseries("Request rate", "reqps", _query(
        f"sum by (route, status) (rate(genloop_requests_total[{RATE}]))", "{{route}} {{status}}")))
    layout.panel(_timeseries("Error rate", "percentunit", *(_query(  # "or vector(0)": no error yet is 0 %, not no data
        f'(sum(rate(genloop_requests_total{{status=~"{kind}.."}}[{RATE}])) or vector(0))'
        f" / sum(rate(genloop_requests_total[{RATE}]))", f"{kind}xx share", ref)
        for kind, ref in (("5", "A"), ("4", "B")))).thresholds(_thresholds((None, "green"), (0.05, "red"))))
    layout.row("Latency")
    layout.panel(_timeseries("End-to-end latency", "s", *_quantiles("genloop_request_latency_seconds")), width=8)
    layout.panel(_timeseries("Time to first token", "s", *_quantiles("genloop_time_to_first_token_seconds")), width=8)
    layout.panel(_timeseries("Inter-token latency", "s", *_quantiles("genloop_inter_token_latency_seconds")), width=8)
    layout.row("Engine")
    layout.panel(_timeseries("Tokens per second", "short", _query(
        f"sum(rate(genloop_generation_tokens_total[{RATE}]))", "generated"), _query(
        f"sum(rate(genloop_prompt_tokens_total[{RATE}]))", "prompt", "B")), width=8)
    layout.panel(_timeseries("Batch size (sequences per decode step)", "short",
                             *_quantiles("genloop_batch_size")), width=8)
    layout.panel(_timeseries("Queue", "short", _query("sum(genloop_requests_running)", "running"),
                             _query("sum(genloop_requests_waiting)", "waiting", "B")), width=8)
    layout.row("Model")
    layout.panel(_timeseries("Served version (replicas)", "short", _query(
        "sum by (model_version) (genloop_model_info)", "v{{model_version}}"),
        description="Replicas serving each version: a rollout shows as one line handing over to the next."))
    layout.panel(_timeseries("Model loads and rollouts", "short", _query(
        f"sum by (model_version) (increase(genloop_model_loads_total[{RATE}]))", "loads v{{model_version}}"),
        _query(f"sum(increase(genloop_model_swaps_total[{RATE}]))", "rollouts", "B")))
    layout.panel(_timeseries("Shadow traffic and dropped log records", "short", _query(
        f"sum by (outcome) (increase(genloop_shadow_requests_total[{RATE}]))", "shadow {{outcome}}"),
        _query(f"sum(increase(genloop_inference_log_dropped_total[{RATE}]))", "log dropped", "B")))
    return layout.dashboard


def quality() -> Dashboard:
    layout = _Layout("genloop · model quality & drift", "genloop-quality",
                     "Drift of live prompts and the gate's metrics per version; promotions and rollbacks annotated.")
    layout.dashboard.annotation(
        AnnotationQuery().name("Alias changes").datasource(DATASOURCE).enable(True).icon_color("purple")
        .expr("changes(genloop_alias_changes_total[5m]) > 0"))
    layout.row("Drift")
    layout.panel(_timeseries("Drift score by feature", "short",
                             _query("genloop_drift_score", "{{feature}}"),
                             _query("genloop_drift_threshold", "threshold {{feature}}", "B"),
                             description="Normed Wasserstein distance (numeric features) or classifier ROC AUC "
                                         "(prompt text), against the threshold each is judged by."))
    layout.panel(_timeseries("Drift detected", "short", _query("genloop_drift_detected", "{{feature}}"))
                 .thresholds(_thresholds((None, "green"), (1, "red"))), width=6)
    layout.panel(_stat("Prompts compared", "short", _query("genloop_drift_samples", "{{side}}")), width=6)
    layout.row("Evaluation")
    layout.panel(_timeseries("Bits per byte by version", "short", _query(
        'genloop_evaluation_metric{metric="bits_per_byte"}', "v{{model_version}} {{set}}")))
    layout.panel(_timeseries("Continuation scores by version", "short", _query(
        'genloop_evaluation_metric{metric=~"bleu|chrf|rouge_l"}', "v{{model_version}} {{set}} {{metric}}")))
    layout.row("Feedback")
    layout.panel(_timeseries("Positive feedback share by version", "percentunit", _query(
        "genloop_feedback_positive_ratio", "v{{model_version}}"),
        description="Share of each version's rated responses that callers rated positive (POST /v1/feedback), "
                    "each response at its latest rating.").min(0).max(1))
    layout.panel(_timeseries("Feedback ratings by version", "short", _query(
        "genloop_feedback_ratings", "v{{model_version}} {{rating}}"),
        description="Rated responses of each version, by their latest rating."))
    layout.row("Lifecycle")
    layout.panel(_stat("Champion", "short", _query("max by (model_version) (genloop_champion_info)",
                                                   "v{{model_version}}")), width=6)
    layout.panel(_stat("Champion age", "s", _query("time() - genloop_champion_promoted_timestamp_seconds", "age"))
                 .thresholds(_thresholds((None, "green"), (14 * 86400, "orange"))), width=6)
    layout.panel(_timeseries("Promotions and rollbacks", "short", _query(
        "sum by (action, outcome) (genloop_alias_changes_total)", "{{action}} {{outcome}}")))
    return layout.dashboard


def training() -> Dashboard:
    layout = _Layout("genloop · training & cost", "genloop-training", "Training runs, their loss, time, $ and kWh.")
    layout.row("Runs")
    layout.panel(_timeseries("Training runs", "short", _query(
        "sum by (outcome) (genloop_training_runs_total)", "{{outcome}}")))
    layout.panel(_stat("Since the last successful retrain", "s", _query(
        "time() - genloop_last_successful_retrain_timestamp_seconds", "age")), width=6)
    layout.panel(_stat("Best validation loss of the champion", "short", _query(
        "genloop_training_best_val_loss * on (model_version) group_left max by (model_version) "
        "(genloop_champion_info)", "v{{model_version}}")), width=6)
    layout.row("Per version")
    for title, unit, metric in (("Validation loss", "short", "genloop_training_best_val_loss"),
                                ("Training time", "s", "genloop_training_duration_seconds"),
                                ("Cost", "currencyUSD", "genloop_training_cost_usd"),
                                ("Energy", "kwatth", "genloop_training_energy_kwh")):
        layout.panel(_timeseries(f"{title} by version", unit, _query(metric, "v{{model_version}}")), width=6)
    return layout.dashboard


def scheduler() -> Dashboard:
    layout = _Layout("genloop · scheduler", "genloop-scheduler", "Retraining jobs: runs, outcomes, last and next run.")
    layout.row("Jobs")
    layout.panel(_timeseries("Job runs by outcome", "short", _query(
        "sum by (job, outcome) (genloop_scheduler_job_runs_total)", "{{job}} {{outcome}}")))
    layout.panel(table.Panel().title("Last and next run").with_target(
        _query("genloop_scheduler_last_run_timestamp_seconds * 1000", "last {{job}}").instant())
        .with_target(_query("genloop_scheduler_next_run_timestamp_seconds * 1000", "next {{job}}", "B").instant())
        .unit("dateTimeAsIso"))
    return layout.dashboard


DASHBOARDS = {"serving": serving, "quality": quality, "training": training, "scheduler": scheduler}


def render() -> dict[str, str]:
    """File name → dashboard JSON, exactly as written to disk."""
    return {f"genloop-{name}.json": json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
            for name, build in DASHBOARDS.items()}


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = out_dir / name
        temporary = path.with_name(f".{name}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(written_path)
