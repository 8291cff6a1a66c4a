"""The local Ray's state API address: its own, unless an operator set one."""

from __future__ import annotations

from genloop.services import cluster


def test_the_state_api_points_at_the_ray_genloop_starts_unless_an_operator_chose(monkeypatch):
    monkeypatch.delenv(cluster.STATE_API_ENV, raising=False)
    monkeypatch.setattr(cluster, "_pinned", {})
    first = cluster.own_state_api()
    assert cluster.os.environ[cluster.STATE_API_ENV] == f"http://127.0.0.1:{first}"
    second = cluster.own_state_api()  # a later local Ray in the same process: its own dashboard, not the last one's
    assert cluster.os.environ[cluster.STATE_API_ENV] == f"http://127.0.0.1:{second}"
    monkeypatch.setenv(cluster.STATE_API_ENV, "http://ray-head:8265")
    cluster.own_state_api()
    assert cluster.os.environ[cluster.STATE_API_ENV] == "http://ray-head:8265"
