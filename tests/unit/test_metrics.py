"""The control plane's collector: what it reports from a snapshot of the records."""

from __future__ import annotations

from genloop.monitoring.metrics import ControlPlaneCollector, ControlPlaneState


def _samples(state: ControlPlaneState, family: str) -> dict[tuple, float]:
    (metric,) = [m for m in ControlPlaneCollector(lambda: state).collect() if m.name == family]
    assert metric.type == "gauge"  # a re-rating can lower a count
    return {tuple(sorted(s.labels.items())): s.value for s in metric.samples}


def test_feedback_is_reported_per_version_as_counts_and_positive_share():
    state = ControlPlaneState(feedback={"3": {"positive": 3, "negative": 1}, "4": {"neutral": 2}, "5": {}})
    assert _samples(state, "genloop_feedback_ratings") == {
        (("model_version", version), ("rating", rating)): count
        for version, counts in (("3", (3, 0, 1)), ("4", (0, 2, 0)), ("5", (0, 0, 0)))
        for rating, count in zip(("positive", "neutral", "negative"), counts)}
    # Only versions with ratings have a share: no rating is no data, not 0 %.
    assert _samples(state, "genloop_feedback_positive_ratio") == {
        (("model_version", "3"),): 0.75, (("model_version", "4"),): 0.0}
    assert _samples(ControlPlaneState(), "genloop_feedback_positive_ratio") == {}
