"""The OpenAI-compatible API on real Ray Serve over loopback, on a real tiny model, through the official
openai client: what needs Serve (its proxy, backpressure, replica restarts), real sockets or the HF
engine. What the API layer decides alone (validation, error shapes, SSE framing, OpenAI and vLLM
parity, the inference log, metrics, fuzzing) is tested in-process over a fake engine: tests/unit/test_api*.py.
"""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import jsonschema
import openai
import pytest

from genloop.serving.app import build_app, serve_app
from genloop.serving.hf.engine import HFEngine
from genloop.serving.hf.options import HFEngineOptions
from genloop.serving.inference_log import read_inference_log
from genloop.serving.protocol import VERSION_HEADER
from genloop.serving.settings import DeploymentOptions, ServerSettings

API_KEY = "sk-test-key"
FLOOD_KEY, STREAMS_KEY = "sk-flood-key", "sk-streams-key"  # clients of the tests of what one client may take
PER_CLIENT = 32


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory, make_tiny_model):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServerSettings(
        served_model_name="genloop", model_uri=str(make_tiny_model()), model_version="7",
        engine_class=HFEngine, engine_options=HFEngineOptions(max_batch_size=8),
        api_keys=[API_KEY, FLOOD_KEY, STREAMS_KEY],
        inference_log_dir=str(root / "inference-log"), max_requests_per_client=PER_CLIENT,
        body_timeout_s=60,  # slow uploads outlast the flood test: it must pass by the per-client limit alone
    )
    serve_app(settings)
    yield {"url": f"http://127.0.0.1:{port}", "log": root / "inference-log"}
    serve.shutdown()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=API_KEY, max_retries=0)


def test_completion_chat_and_models_through_openai_client(client, server):
    completion = client.completions.create(model="genloop", prompt="The for statement", max_tokens=8,
                                           temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    assert completion.model_extra["model_version"] == "7"

    several = client.completions.create(model="genloop", prompt=["a", "b"], n=2, max_tokens=4, temperature=0.8,
                                        seed=1)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]

    chat = client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens > 0

    models = client.models.list()
    assert [m.id for m in models.data] == ["genloop"]

    raw = httpx.post(f"{server['url']}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": "genloop", "prompt": "x", "max_tokens": 2})
    assert raw.headers[VERSION_HEADER] == "7"
    health = httpx.get(f"{server['url']}/health")  # the health deployment's, beside the model's
    assert health.status_code == 200 and health.json()["model_version"] == "7"


def test_a_json_schema_response_format_through_the_hf_engine(client):
    """The HF engine enforces response_format by constrained decoding (llguidance), and refuses a
    schema it cannot enforce with a 400 naming response_format."""
    schema = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    answer = client.chat.completions.create(
        model="genloop", messages=[{"role": "user", "content": "Reply in JSON"}], max_tokens=30, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "bad", "schema": {"type": "frob"}}})
    assert refused.value.param == "response_format"


def _metric(server, name: str, **labels: str) -> float:
    """The sum of the replica's samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server['url']}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_client_disconnect_cancels_its_generation(client, server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    aborted = {"route": "completions", "status": "499", "finished_reason": "abort"}
    aborts = _metric(server, "genloop_requests_total", **aborted)
    with httpx.stream("POST", f"{server['url']}/v1/completions", headers=headers,
                      json={"model": "genloop", "prompt": "cancel me", "max_tokens": 200, "stream": True,
                            "temperature": 0}) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    # The connection is closed after the first event. Had generation gone on, it would have finished
    # its 200 tokens and been logged as a 200; a cancelled one is logged as cut off by the client (499).
    time.sleep(3)
    client.completions.create(model="genloop", prompt="after cancel", max_tokens=2)
    deadline = time.time() + 15
    while time.time() < deadline and "after cancel" not in read_inference_log(server["log"]).column(
            "prompt").to_pylist():
        time.sleep(0.5)
    rows = read_inference_log(server["log"]).to_pylist()
    assert "after cancel" in [row["prompt"] for row in rows]
    assert [row["status"] for row in rows if row["prompt"] == "cancel me"] == [499]
    assert _metric(server, "genloop_requests_total", **aborted) == aborts + 1  # counted once, as the caller's leaving
    running = [line for line in httpx.get(f"{server['url']}/metrics", headers=headers).text.splitlines()
               if line.startswith("genloop_requests_running{")]
    assert running and running[0].endswith(" 0.0")


def test_backpressure_refuses_instead_of_queueing_forever(server, make_tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    settings = ServerSettings(served_model_name="genloop", model_uri=str(make_tiny_model()),
                              model_version="8", engine_class=HFEngine,
                              engine_options=HFEngineOptions(max_batch_size=1))
    serve.run(build_app(settings, DeploymentOptions(max_ongoing_requests=1, max_queued_requests=1)), name="tight",
              route_prefix="/tight")
    try:
        def call(_: int) -> httpx.Response:
            return httpx.post(f"{server['url']}/tight/v1/completions", timeout=120,
                              json={"model": "genloop", "prompt": "busy", "max_tokens": 60})

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(call, range(10)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429} and statuses.count(429) >= 5 and 200 in statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"  # the openai client waits that long, then retries
        # Serve's proxy refused it before our app ran; its answer is rewritten in OpenAI's shape all the same.
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", 429) and "backpressure" in error["message"]
    finally:
        serve.delete("tight")


def test_a_flood_of_slow_uploads_takes_neither_health_nor_other_clients_capacity(server):
    """100 connections of one client send their headers and one byte of body, then hold: 66 such once
    held every request slot, and /health and every other caller waited until the sockets closed. Now
    that client holds at most PER_CLIENT of the replica's slots and the rest are refused at once,
    /health answers from a deployment of its own, another client's 32 streams complete, and every
    one of the 132 requests is a row of the inference log with its status."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    url, flood_size = server["url"], 100
    host, port = url.removeprefix("http://").split(":")
    started = datetime.now(UTC)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {FLOOD_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode()
    flood: list[socket.socket] = []
    try:
        for _ in range(flood_size):
            flood.append(socket.create_connection((host, int(port)), timeout=30))
            flood[-1].sendall(head)
        answered: dict[socket.socket, bytes] = {}
        deadline = time.time() + 60
        while len(answered) < flood_size - PER_CLIENT and time.time() < deadline:
            waiting = [sock for sock in flood if sock not in answered]
            for sock in select.select(waiting, [], [], 1)[0]:
                answered[sock] = sock.recv(65536)
        assert [reply.split(b" ")[1] for reply in answered.values()] == [b"429"] * (flood_size - PER_CLIENT)
        assert all(b"retry-after: 1" in reply.lower() for reply in answered.values())

        # The flood still holds PER_CLIENT slots, for up to the body deadline of 60 s: a /health behind
        # them, or streams that needed their slots, would wait that long.
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 200 and health.json()["model_version"] == "7"
        print(f"/health under the flood: {health.elapsed.total_seconds():.3f} s")

        def stream(i: int) -> tuple[int, str]:
            with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {STREAMS_KEY}"},
                              json={"model": "genloop", "prompt": f"stream {i}", "max_tokens": 8, "stream": True},
                              timeout=50) as response:
                return response.status_code, [line for line in response.iter_lines() if line][-1]

        with ThreadPoolExecutor(32) as pool:
            assert list(pool.map(stream, range(32))) == [(200, "data: [DONE]")] * 32
    finally:
        for sock in flood:
            sock.close()

    def statuses() -> Counter:
        rows = read_inference_log(server["log"], since=started).to_pylist()
        return Counter(row["status"] for row in rows if row["route"] == "completions")

    deadline = time.time() + 30
    while sum(statuses().values()) < flood_size + 32 and time.time() < deadline:
        time.sleep(0.5)
    assert statuses() == {200: 32, 429: flood_size - PER_CLIENT, 499: PER_CLIENT}


def test_a_replica_killed_under_load_loses_no_log_row(server, own_ray_processes):
    """SIGKILL the model's replica while 4 clients send requests: Serve starts a new one, and every
    request that was answered 200 is a row of the inference log (the dead replica's rows come back
    from its spool). How many requests failed while no replica ran is printed, not asserted: that is
    Serve's recovery, not the log's."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime


    url, started = server["url"], datetime.now(UTC)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def call(i: int) -> tuple[int, str]:
        try:
            answer = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                                json={"model": "genloop", "prompt": f"load {i}", "max_tokens": 4})
            return answer.status_code, answer.json().get("id", "") if answer.status_code == 200 else ""
        except httpx.HTTPError:
            return 0, ""

    (replica,) = own_ray_processes("ray::ServeReplica:genloop:genloop")
    with ThreadPoolExecutor(4) as pool:
        first = pool.map(call, range(40))
        time.sleep(1)
        replica.kill()
        answers = list(first) + list(pool.map(call, range(40, 120)))
    answered = {response_id for status, response_id in answers if status == 200}
    print(f"replica SIGKILL under load: {len(answers) - len(answered)} of {len(answers)} requests failed")

    deadline = time.time() + 60  # the dead replica's rows land when its successor starts
    logged: set[str] = set()
    while not answered <= logged and time.time() < deadline:
        time.sleep(1)
        rows = read_inference_log(server["log"], since=started).to_pylist()
        logged = {row["request_id"] for row in rows if row["status"] == 200}
    assert len(answered) >= 60 and answered - logged == set()
