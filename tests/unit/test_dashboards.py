"""The committed Grafana dashboards are what the code generates, and query only metrics genloop defines."""

from __future__ import annotations

import json
import re

from prometheus_client.registry import REGISTRY

from genloop.monitoring import dashboards, metrics
from genloop.monitoring.metrics import ControlPlaneCollector, ControlPlaneState


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
    assert committed == rendered, "stale dashboards: run `python -m genloop.monitoring.dashboards` and commit the result"


def test_every_panel_queries_metrics_the_code_defines():
    assert metrics.REQUESTS  # the instruments are registered by importing the module
    defined = _exposed_names()
    for name, text in dashboards.render().items():
        dashboard = json.loads(text)
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels and all(p.get("targets") for p in panels), name
        for expr in _expressions(dashboard):
            used = set(re.findall(r"\bgenloop_[a-z_]+", expr))
            assert used and used <= defined, (name, expr, used - defined)
