"""Every Prometheus instrument genloop exports, in one place (DESIGN.md: prefix ``genloop_``,
unit suffixes, bounded labels — a model version, a route, a status; never a request id or text).

Latency buckets span what LLM serving sees: a few milliseconds per token up to minutes for a
long completion on CPU, so p50/p95/p99 stay resolvable at both ends.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

REQUESTS = Counter("genloop_requests_total", "API requests answered.", ["route", "status", "model_version"])
REQUEST_LATENCY = Histogram(
    "genloop_request_latency_seconds", "Arrival to last byte.", ["route", "model_version"], buckets=LATENCY_BUCKETS
)
TIME_TO_FIRST_TOKEN = Histogram(
    "genloop_time_to_first_token_seconds", "Arrival to first generated token.", ["route", "model_version"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "genloop_inter_token_latency_seconds", "Mean time between generated tokens, per request.",
    ["route", "model_version"], buckets=TOKEN_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("genloop_prompt_tokens_total", "Prompt tokens processed.", ["model_version"])
GENERATION_TOKENS = Counter("genloop_generation_tokens_total", "Tokens generated.", ["model_version"])
REQUESTS_RUNNING = Gauge("genloop_requests_running", "Sequences being decoded now.", ["model_version"])
REQUESTS_WAITING = Gauge("genloop_requests_waiting", "Requests queued in the engine.", ["model_version"])
MODEL_INFO = Gauge("genloop_model_info", "1 for the model version this replica serves.", ["model_version"])
INFERENCE_LOG_DROPPED = Counter(
    "genloop_inference_log_dropped_total", "Inference-log records dropped because the buffer was full."
)
