"""The committed Grafana dashboards are what the code generates, and they and the alert rules query only
metrics that exist: genloop's own, or Ray Serve's as the installed Ray exports them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ray.serve
from prometheus_client.registry import REGISTRY

from genloop.monitoring import alerts, dashboards, metrics
from genloop.monitoring.metrics import ControlPlaneCollector, ControlPlaneState

NAMES = re.compile(r"\b(?:genloop|ray)_[a-z_]+")


def _exposed_names() -> set[str]:
    """Every sample name genloop's instruments can expose (counters gain _total, histograms _bucket …)."""
    families = [f for f in REGISTRY.collect() if f.name.startswith("genloop_")]
    families += list(ControlPlaneCollector(ControlPlaneState).describe())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + suffix for f in families for suffix in suffixes[f.type]}


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t]
    return exprs + [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]


def test_committed_dashboards_are_up_to_date():
    rendered = dashboards.render()
    committed = {p.name: p.read_text(encoding="utf-8") for p in dashboards.OUT_DIR.glob("*.json")}
    assert committed == rendered, "stale: run `python -m genloop.monitoring.dashboards` and commit the result"


def test_every_panel_and_alert_queries_metrics_that_exist():
    assert metrics.REQUESTS  # the instruments are registered by importing the module
    known = _exposed_names() | set(dashboards.SERVE_METRICS)
    for name, text in dashboards.render().items():
        dashboard = json.loads(text)
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels and all(p.get("targets") for p in panels), name
        for expr in _expressions(dashboard):
            used = set(NAMES.findall(expr))
            assert used and used <= known, (name, expr, used - known)
    for group in alerts.rules()["groups"]:
        for rule in group["rules"]:
            assert set(NAMES.findall(rule["expr"])) <= known, (rule, set(NAMES.findall(rule["expr"])) - known)


def test_serve_metrics_are_those_the_installed_ray_exports():
    """Ray prefixes its metrics with ray_ and counters with _total; Serve defines them in its source, or
    (for the proxy's per-protocol families, named by an f-string) Ray's own Serve dashboards query them."""
    serve = Path(ray.serve.__file__).parent
    source = "\n".join(p.read_text(encoding="utf-8") for p in serve.rglob("*.py"))
    ray_dashboards = Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    panels = "\n".join(p.read_text(encoding="utf-8") for p in ray_dashboards.glob("serve*_panels.py"))
    for name in dashboards.SERVE_METRICS:
        defined = '"' + re.sub(r"_total$", "", name.removeprefix("ray_")) + '"'
        assert defined in source or name in panels, name


def test_the_serving_filters_are_variables_every_replica_query_applies():
    serving = json.loads(dashboards.render()["genloop-serving.json"])
    variables = [v["name"] for v in serving["templating"]["list"] if v["type"] == "query"]
    assert variables == ["model_version", "replica", "route"]
    exprs = _expressions(serving)
    for variable in variables:
        assert any(f"${variable}" in expr for expr in exprs), variable
    exported_by_replicas = {n for n in _exposed_names() if not n.startswith(("genloop_model_swaps", "genloop_drift"))}
    for expr in exprs:  # a replica's series is narrowed by its replica; Serve's and the control plane's are not
        if set(NAMES.findall(expr)) & exported_by_replicas:
            assert '$replica' in expr, expr
