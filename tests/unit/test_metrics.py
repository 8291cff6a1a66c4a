"""What genloop counts: a replica's accounting of each request and its sequences, and the control
plane's collector, from a snapshot of the records."""

from __future__ import annotations

import time

from prometheus_client.registry import REGISTRY

from genloop.monitoring.metrics import ControlPlaneCollector, ControlPlaneState
from genloop.serving.app import _Answer
from genloop.serving.engine import GenerationResult

VERSION = "unit-accounting"  # a version of its own: no other test moves these series


def _samples(state: ControlPlaneState, family: str) -> dict[tuple, float]:
    (metric,) = [m for m in ControlPlaneCollector(lambda: state).collect() if m.name == family]
    assert metric.type == "gauge"  # a re-rating can lower a count
    return {tuple(sorted(s.labels.items())): s.value for s in metric.samples}


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"model_version": VERSION, **labels}) or 0.0


def _result(tokens: int, finish: str = "length") -> GenerationResult:
    return GenerationResult(text="x" * tokens, finish_reason=finish, prompt_tokens=3, completion_tokens=tokens,
                            ttft_seconds=0.1, total_seconds=0.1 + 0.01 * (tokens - 1), queue_seconds=0.02,
                            inter_token_seconds=[0.01] * (tokens - 1))


def test_a_request_counts_once_whatever_its_choices_and_each_sequence_has_its_timings() -> None:
    rows: list[tuple] = []
    # Two prompts × n=2: four sequences, one request.
    answer = _Answer("completions", VERSION, time.perf_counter(), 4, lambda *row: rows.append(row))
    for tokens in (1, 2, 3, 4):
        answer("a prompt", _result(tokens, "stop" if tokens < 4 else "length"), 200)
    route = {"route": "completions"}
    assert _value("genloop_requests_total", **route, status="200", finished_reason="length") == 1
    assert _value("genloop_time_to_first_token_seconds_count", **route) == 4
    assert _value("genloop_request_queue_time_seconds_count", **route) == 4
    assert _value("genloop_inter_token_latency_seconds_count", **route) == 0 + 1 + 2 + 3  # one per gap
    assert _value("genloop_time_per_output_token_seconds_count", **route) == 3  # a single token has no gap
    assert _value("genloop_request_generation_tokens_count", **route) == 1
    assert _value("genloop_request_generation_tokens_sum", **route) == 10
    assert _value("genloop_request_prompt_tokens_sum", **route) == 12
    assert [(row[0], row[2]) for row in rows] == [("a prompt", 200)] * 4  # a log row per choice


def test_a_stream_cut_short_counts_once_with_the_status_of_what_cut_it() -> None:
    rows: list[tuple] = []
    chat = {"route": "chat.completions"}
    # One choice finished, one failed; closing the stream cuts off the third, which reports later.
    answer = _Answer("chat.completions", VERSION, time.perf_counter(), 3, lambda *row: rows.append(row))
    answer("p", _result(2, "stop"), 200)
    answer("p", None, 503)
    answer.close()
    answer("p", None, 499)
    assert _value("genloop_requests_total", **chat, status="503", finished_reason="error") == 1
    assert _value("genloop_requests_total", **chat, status="499", finished_reason="abort") == 0
    assert _value("genloop_requests_total", **chat, status="200", finished_reason="stop") == 0
    assert [row[2] for row in rows] == [200, 503, 499]
    # The caller leaving before any choice ended.
    _Answer("chat.completions", VERSION, time.perf_counter(), 2, lambda *row: None).close()
    assert _value("genloop_requests_total", **chat, status="499", finished_reason="abort") == 1
    assert _value("genloop_request_latency_seconds_count", **chat) == 2


def test_feedback_is_reported_per_version_as_counts_and_positive_share():
    state = ControlPlaneState(feedback={"3": {"positive": 3, "negative": 1}, "4": {"neutral": 2}, "5": {}})
    assert _samples(state, "genloop_feedback_ratings") == {
        (("model_version", version), ("rating", rating)): count
        for version, counts in (("3", (3, 0, 1)), ("4", (0, 2, 0)), ("5", (0, 0, 0)))
        for rating, count in zip(("positive", "neutral", "negative"), counts, strict=True)}
    # Only versions with ratings have a share: no rating is no data, not 0 %.
    assert _samples(state, "genloop_feedback_positive_ratio") == {
        (("model_version", "3"),): 0.75, (("model_version", "4"),): 0.0}
    assert _samples(ControlPlaneState(), "genloop_feedback_positive_ratio") == {}
