"""Grafana dashboards as code (grafana-foundation-sdk): serving, model quality & drift, training & cost,
scheduler.

``python -m genloop.monitoring.dashboards`` writes them to ``deploy/grafana/dashboards/*.json``, the folder
Grafana's provisioning (``deploy/grafana/provisioning/``) loads. The tests regenerate them and fail
when the committed JSON is stale or a query names a metric ``monitoring.metrics`` does not define (or,
for Ray Serve's own series, one the installed Ray does not export). Every series is summed over
replicas (each scraped on its own, see ``monitoring.scrape_targets``); the serving dashboard's
``model_version``, ``replica`` and ``route`` variables narrow it to some of them. Counters are shown as
rates: a running total only ever climbs, and hides when things happened.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

OUT_DIR = Path(__file__).parents[1] / "deploy" / "grafana" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# Grafana has no unit for tokens: a custom suffix ("suffix:<text>") labels the axis instead.
TOKENS_PER_SECOND, TOKENS = "suffix: tokens/s", "suffix: tokens"

# Ray Serve's own series (Ray 2.60; ray_ prefixed by Ray's metrics agent, counters with _total), from
# the "ray" scrape job: what Serve sheds and queues before a request reaches a replica never shows in
# genloop's counters. The tests check each name against the installed Ray.
SERVE_METRICS = (
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_deployment_queued_queries",
    "ray_serve_num_ongoing_requests_at_replicas",
    "ray_serve_num_router_requests_total",
)

# The serving dashboard's filters: a replica's series carry model_version and (from its scrape target)
# replica; the request series carry route too. "All" matches any value, a missing label included.
TARGET = 'replica=~"$replica"'
REPLICA = f'model_version=~"$model_version", {TARGET}'
ROUTE = f'{REPLICA}, route=~"$route"'
GENERATION = f'{ROUTE}, route=~"completions|chat.completions"'  # the routes that generate


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _quantiles(metric: str, selector: str = "", by: str = "") -> list[prometheus.Dataquery]:
    group = f"le{', ' + by if by else ''}"
    return [_query(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
                   f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""), ref)
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))]


def _variable(name: str, label: str, query: str) -> QueryVariable:
    """A multi-value filter over the values ``query`` finds, "All" by default."""
    return (QueryVariable(name).label(label).query(query).datasource(DATASOURCE).multi(True).include_all(True)
            .all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))


class _Layout:
    """Assigns panel ids and packs panels into rows of 24 columns."""

    def __init__(self, title: str, uid: str, description: str, variables: tuple[QueryVariable, ...] = ()):
        self.dashboard = (
            Dashboard(title).uid(uid).description(description).tags(["genloop"]).refresh("30s")
            .time("now-6h", "now").timezone("browser")
            .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        )
        for variable in variables:
            self.dashboard.with_variable(variable)
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
    layout = _Layout(
        "genloop · serving", "genloop-serving", "The OpenAI-compatible endpoint: genloop's replicas, summed over those "
        "the variables select, and Ray Serve in front of them.",
        (_variable("model_version", "Model version", "label_values(genloop_model_info, model_version)"),
         _variable("replica", "Replica", "label_values(genloop_model_info, replica)"),
         _variable("route", "Route", "label_values(genloop_requests_total, route)")))
    layout.row("Traffic")
    layout.panel(_timeseries("Request rate", "reqps", _query(
        f"sum by (route, status) (rate(genloop_requests_total{{{ROUTE}}}[{RATE}]))", "{{route}} {{status}}"),
        description="Requests answered, each once however many prompts and choices it has."), width=8)
    layout.panel(_timeseries("Error rate", "percentunit", *(_query(  # "or vector(0)": no error yet is 0 %, not no data
        f'(sum(rate(genloop_requests_total{{{ROUTE}, status=~"{kind}.."}}[{RATE}])) or vector(0))'
        f" / sum(rate(genloop_requests_total{{{ROUTE}}}[{RATE}]))", f"{kind}xx share", ref)
        for kind, ref in (("5", "A"), ("4", "B"))), description="A stream that fails after it began counts with the "
        "status of its error.").thresholds(_thresholds((None, "green"), (0.05, "red"))), width=8)
    layout.panel(_timeseries("How generations ended", "reqps", _query(
        f"sum by (finished_reason) (rate(genloop_requests_total{{{GENERATION}}}[{RATE}]))", "{{finished_reason}}"),
        description="stop (eos or a stop string), length (some choice hit max_tokens), abort (the caller left), "
                    "error (refused or failed)."), width=8)
    layout.row("Latency")
    layout.panel(_timeseries("End-to-end latency", "s", *_quantiles("genloop_request_latency_seconds", ROUTE)),
                 width=8)
    layout.panel(_timeseries("Time to first token", "s", *_quantiles("genloop_time_to_first_token_seconds", ROUTE),
                             description="Per sequence (one choice of one prompt)."), width=8)
    layout.panel(_timeseries("Queue time in the engine", "s", *_quantiles("genloop_request_queue_time_seconds", ROUTE),
                             description="Arrival at the engine to first scheduling, per sequence (the HF engine; "
                                         "vLLM reports vllm:request_queue_time_seconds)."), width=8)
    layout.panel(_timeseries("Inter-token latency", "s", *_quantiles("genloop_inter_token_latency_seconds", ROUTE),
                             description="Every gap between two consecutive tokens of a sequence."))
    layout.panel(_timeseries("Time per output token", "s", *_quantiles("genloop_time_per_output_token_seconds", ROUTE),
                             description="The mean gap of each finished sequence: one value per sequence."))
    layout.row("Tokens")
    layout.panel(_timeseries("Tokens per second", TOKENS_PER_SECOND, _query(
        f"sum(rate(genloop_generation_tokens_total{{{ROUTE}}}[{RATE}]))", "generated"), _query(
        f"sum(rate(genloop_prompt_tokens_total{{{ROUTE}}}[{RATE}]))", "prompt", "B")), width=8)
    layout.panel(_timeseries("Prompt tokens per request", TOKENS, *_quantiles("genloop_request_prompt_tokens", ROUTE),
                             description="All prompts × choices of a request: what the engine prefilled."), width=8)
    layout.panel(_timeseries("Generated tokens per request", TOKENS,
                             *_quantiles("genloop_request_generation_tokens", ROUTE)), width=8)
    layout.row("Engine")
    layout.panel(_timeseries("Sequences running and waiting", "short", _query(
        f"sum by (replica) (genloop_requests_running{{{REPLICA}}})", "running {{replica}}"), _query(
        f"sum by (replica) (genloop_requests_waiting{{{REPLICA}}})", "waiting {{replica}}", "B"),
        description="Per replica: decoded now, and arrived but not yet scheduled."))
    layout.panel(_timeseries("Batch size (sequences per decode step)", "short",
                             *_quantiles("genloop_batch_size", REPLICA)))
    layout.row("Ray Serve: in front of the replicas")
    layout.panel(_timeseries("Serve's HTTP errors and load shedding", "reqps", _query(
        f'sum by (error_code) (rate(ray_serve_num_http_error_requests_total{{route!~"/-/.*"}}[{RATE}]))',
        "{{error_code}}"), _query(
        f'sum(rate(ray_serve_num_http_requests_total{{route!~"/-/.*"}}[{RATE}]))', "all requests", "B"),
        description="As Serve's proxy answered them: 429 is a request shed by max_queued_requests (or by a "
                    "replica's own limits), and a 5xx here that genloop's error rate lacks never reached a replica. "
                    "Not filtered by the variables."), width=8)
    layout.panel(_timeseries("Queued in Serve", "short", _query(
        "sum by (deployment) (ray_serve_deployment_queued_queries)", "queued {{deployment}}"), _query(
        "sum by (deployment) (ray_serve_num_ongoing_requests_at_replicas)", "at replicas {{deployment}}", "B"),
        description="Requests waiting in Serve's router for a replica slot (max_ongoing_requests), and those "
                    "the replicas hold."), width=8)
    layout.panel(_timeseries("Routed by Serve", "reqps", _query(
        f"sum by (deployment) (rate(ray_serve_num_router_requests_total[{RATE}]))", "{{deployment}}"),
        description="Requests Serve's routers sent to each deployment, the shadow's mirrored ones included."),
        width=8)
    layout.row("Model")
    layout.panel(_timeseries("Served version (replicas)", "short", _query(
        f"sum by (model_version) (genloop_model_info{{{REPLICA}}})", "v{{model_version}}"),
        description="Replicas serving each version: a rollout shows as one line handing over to the next."))
    layout.panel(_timeseries("Model loads and rollouts per hour", "short", _query(
        f"sum by (model_version) (increase(genloop_model_loads_total{{{REPLICA}}}[1h]))", "loads v{{model_version}}"),
        _query("sum(increase(genloop_model_swaps_total[1h]))", "rollouts", "B")))
    layout.panel(_timeseries("Shadow traffic", "reqps", _query(
        f"sum by (outcome) (rate(genloop_shadow_requests_total{{{TARGET}}}[{RATE}]))", "shadow {{outcome}}"),
        description="Requests mirrored to the challenger, by whether it answered."))
    layout.panel(_timeseries("Inference-log records dropped", "suffix: records/s", _query(
        f"sum by (replica) (rate(genloop_inference_log_dropped_total{{{TARGET}}}[{RATE}]))", "{{replica}}"),
        description="Rows lost because a replica's log buffer was full: drift checks and retraining miss them.")
                 .thresholds(_thresholds((None, "green"), (1e-9, "red"))))
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
    layout.panel(_timeseries("Promotions and rollbacks in the last 24 h", "short", _query(
        "sum by (action, outcome) (increase(genloop_alias_changes_total[1d]))", "{{action}} {{outcome}}")))
    return layout.dashboard


def training() -> Dashboard:
    layout = _Layout("genloop · training & cost", "genloop-training", "Training runs, their loss, time, $ and kWh.")
    layout.row("Runs")
    layout.panel(_timeseries("Training runs in the last 24 h", "short", _query(
        "sum by (outcome) (increase(genloop_training_runs_total[1d]))", "{{outcome}}")))
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
    layout.panel(_timeseries("Job runs in the last 24 h by outcome", "short", _query(
        "sum by (job, outcome) (increase(genloop_scheduler_job_runs_total[1d]))", "{{job}} {{outcome}}")))
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
