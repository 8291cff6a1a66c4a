"""The OpenAI-compatible API on real Ray Serve over loopback, through the official openai client."""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Any

import httpx
import openai
import pytest

from genloop.serving.app import build_app, serve_app
from genloop.serving.hf.engine import HFEngine
from genloop.serving.hf.options import HFEngineOptions
from genloop.serving.inference_log import feedback_by_version, read_inference_log
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
        served_model_name="genloop", model_path=str(make_tiny_model(root / "model")), model_version="7",
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


def test_streaming_sends_chunks_usage_and_done(client, server):
    stream = client.completions.create(model="genloop", prompt="Lists are", max_tokens=6, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    whole = client.completions.create(model="genloop", prompt="Lists are", max_tokens=6, temperature=0)
    assert text == whole.choices[0].text

    chat = client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0, stream=True)
    deltas = list(chat)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert deltas[-1].choices[0].finish_reason in ("stop", "length")

    with httpx.stream("POST", f"{server['url']}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "genloop", "prompt": "x", "max_tokens": 2, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("payload, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "genloop", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "genloop", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "genloop", "prompt": ""}, 400, "prompt"),
    ({"model": "genloop", "prompt": "x", "n": 100}, 400, "n"),
    ({"model": "genloop", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "genloop", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "genloop", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": "genloop", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_shaped_4xx(server, payload, status, param):
    response = httpx.post(f"{server['url']}/v1/completions", json=payload,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_auth_body_size_and_json_errors(server):
    url = f"{server['url']}/v1/completions"
    assert httpx.post(url, json={"model": "genloop", "prompt": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0).models.list()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    assert httpx.post(url, content=b"{not json", headers=headers).status_code == 400
    huge = httpx.post(url, json={"model": "genloop", "prompt": "x" * 2_000_000}, headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["message"]
    health = httpx.get(f"{server['url']}/health")
    assert health.status_code == 200 and health.json()["model_version"] == "7"


def test_every_request_lands_in_the_inference_log(client, server):
    import time

    client.completions.create(model="genloop", prompt="logged prompt", max_tokens=3, temperature=0, user="alice")
    list(client.completions.create(model="genloop", prompt="streamed prompt", max_tokens=3, stream=True,
                                   temperature=0))  # greedy: a sampled eos would end it early
    deadline = time.time() + 15
    while time.time() < deadline:
        prompts = read_inference_log(server["log"]).column("prompt").to_pylist()
        if {"logged prompt", "streamed prompt"} <= set(prompts):
            break
        time.sleep(0.5)
    rows = read_inference_log(server["log"]).to_pylist()
    streamed = next(r for r in rows if r["prompt"] == "streamed prompt")
    assert streamed["completion_tokens"] == 3 and streamed["ttft_seconds"] is not None
    row = next(r for r in rows if r["prompt"] == "logged prompt")
    assert row["model_version"] == "7" and row["status"] == 200 and row["completion_tokens"] == 3
    assert row["client_hash"] and row["client_hash"] != "alice"


def test_feedback_rates_a_response_and_joins_the_version_that_answered_it(client, server):
    url, headers = f"{server['url']}/v1/feedback", {"Authorization": f"Bearer {API_KEY}"}
    rated = client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "Rate me"}],
                                           max_tokens=2)
    assert httpx.post(url, json={"id": rated.id, "rating": 1}).status_code == 401  # the API's keys, like /v1/*

    for payload, param in (({"id": "cmpl-123", "rating": 1}, "id"), ({"id": "req-" + rated.id, "rating": 1}, "id"),
                           ({"id": rated.id, "rating": 2}, "rating"), ({"id": rated.id}, "rating"),
                           ({"id": rated.id, "rating": True}, "rating"),
                           ({"id": rated.id, "rating": 1, "stars": 5}, "stars"),
                           ({"id": rated.id, "rating": 1, "comment": "x" * 5000}, "comment")):
        answer = httpx.post(url, json=payload, headers=headers)
        assert answer.status_code == 400, (payload, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], payload

    first = httpx.post(url, json={"id": rated.id, "rating": -1, "comment": "too short"}, headers=headers)
    assert first.status_code == 200 and first.json() == {"id": rated.id, "object": "feedback", "rating": -1}
    assert first.headers[VERSION_HEADER] == "7"
    assert httpx.post(url, json={"id": rated.id, "rating": 1}, headers=headers).status_code == 200  # changed mind

    deadline = time.time() + 15
    while time.time() < deadline and feedback_by_version(server["log"]) != {"7": {1: 1}}:
        time.sleep(0.5)
    assert feedback_by_version(server["log"]) == {"7": {1: 1}}  # rated once, at its latest rating
    rows = [row for row in read_inference_log(server["log"]).to_pylist() if row["request_id"] == rated.id]
    assert [(row["route"], row["model_version"], row["status"], row["rating"], row["output"]) for row in rows] == [
        ("chat.completions", "7", 200, None, rated.choices[0].message.content),
        ("feedback", "", 200, -1, "too short"), ("feedback", "", 200, 1, "")]
    text = httpx.get(f"{server['url']}/metrics", headers=headers).text
    assert 'genloop_requests_total{model_version="7",route="feedback",status="200"} 2.0' in text


def test_feedback_without_an_inference_log_is_refused_not_lost(server, make_tiny_model, tmp_path):
    from ray import serve

    settings = ServerSettings(served_model_name="genloop", model_path=str(make_tiny_model(tmp_path / "m")),
                              model_version="9", engine_class=HFEngine)
    serve.run(build_app(settings), name="unlogged", route_prefix="/unlogged")
    try:
        answer = httpx.post(f"{server['url']}/unlogged/v1/feedback", json={"id": "cmpl-" + "0" * 24, "rating": 1})
        assert answer.status_code == 503 and "inference log" in answer.json()["error"]["message"]
    finally:
        serve.delete("unlogged")


def test_streaming_request_the_engine_refuses_is_a_4xx_not_a_200(server):
    response = httpx.post(f"{server['url']}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "genloop", "prompt": "x", "max_tokens": 100000, "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_seeded_choices_differ_from_each_other_and_repeat_across_calls(client):
    def texts() -> list[str]:
        result = client.completions.create(model="genloop", prompt="The", n=3, max_tokens=8, temperature=1.0,
                                           seed=5)
        return [c.text for c in sorted(result.choices, key=lambda c: c.index)]

    first = texts()
    assert len(set(first)) > 1
    assert texts() == first


def test_metrics_count_requests_by_route_status_and_version(client, server):
    client.completions.create(model="genloop", prompt="count me", max_tokens=2)
    httpx.post(f"{server['url']}/v1/completions", json={"model": "nope", "prompt": "x"},
               headers={"Authorization": f"Bearer {API_KEY}"})
    assert httpx.get(f"{server['url']}/metrics").status_code == 401  # only /health is public once keys are set
    text = httpx.get(f"{server['url']}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'genloop_requests_total{model_version="7",route="completions",status="200"}' in text
    assert 'genloop_requests_total{model_version="7",route="completions",status="404"}' in text
    assert 'genloop_model_info{model_version="7"} 1.0' in text
    assert "genloop_time_to_first_token_seconds_bucket" in text and "genloop_requests_running" in text


def test_client_disconnect_cancels_its_generation(client, server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
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
    running = [line for line in httpx.get(f"{server['url']}/metrics", headers=headers).text.splitlines()
               if line.startswith("genloop_requests_running{")]
    assert running and running[0].endswith(" 0.0")


def test_backpressure_refuses_instead_of_queueing_forever(server, make_tiny_model, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    settings = ServerSettings(served_model_name="genloop", model_path=str(make_tiny_model(tmp_path / "m")),
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
    finally:
        serve.delete("tight")


def test_hostile_inputs_get_a_clear_4xx_and_are_logged(server):
    """Each input once gave a 500 or a silent empty success; now a 4xx naming the problem, and a row."""
    url, headers = server["url"], {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    completion = {"model": "genloop", "prompt": "x", "max_tokens": 2}
    chat = {"model": "genloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def post(path: str, payload: dict | None = None, raw: Any = None) -> httpx.Response:
        return httpx.post(f"{url}/v1/{path}", headers=headers, timeout=30,
                          content=raw if raw is not None else json.dumps(payload).encode())

    probes = {
        "seed past 64 bits": post("completions", {**completion, "seed": 2**64}),
        "top_k past 32 bits": post("completions", {**completion, "top_k": 2**40}),
        "max_tokens past 32 bits": post("chat/completions", {**chat, "max_tokens": 2**40}),
        "lone surrogate": post("completions", raw=b'{"model": "genloop", "prompt": "\\ud800"}'),
        "lone surrogate, streamed": post("completions", raw=b'{"model": "genloop", "prompt": "a\\ud800", '
                                                            b'"stream": true}'),
        "lone surrogate in chat": post("chat/completions", raw=b'{"model": "genloop", "messages": [{"role": '
                                                               b'"user", "content": "\\udfff"}]}'),
        "prompt that cannot fit": post("completions", {**completion, "prompt": "word " * 180_000}),
        "model name of 100 KB": post("completions", {**completion, "model": "m" * 100_000}),
        "parameter name of 100 KB": post("completions", {**completion, "p" * 100_000: 1}),
        "chunked body of 10 MB": post("completions", raw=(b" " * 65536 for _ in range(160))),
    }
    statuses = {name: answer.status_code for name, answer in probes.items()}
    assert statuses == {**{name: 400 for name in probes}, "model name of 100 KB": 404,
                        "chunked body of 10 MB": 413}, statuses
    for name, answer in probes.items():
        error = answer.json()["error"]
        assert len(error["message"]) < 300 and error["type"] in ("invalid_request_error", "not_found_error"), name
    assert probes["seed past 64 bits"].json()["error"]["param"] == "seed"
    assert probes["lone surrogate"].json()["error"]["param"] == "prompt"
    assert probes["lone surrogate in chat"].json()["error"]["param"] == "messages.0.content"
    assert "cannot fit" in probes["prompt that cannot fit"].json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200

    seeded = post("completions", {**completion, "seed": 2**63 - 1, "n": 2, "temperature": 1})
    assert seeded.status_code == 200 and len(seeded.json()["choices"]) == 2  # seed + 1 wraps, as int64 would

    ids = {answer.headers["x-request-id"] for answer in probes.values()}
    deadline = time.time() + 15
    while time.time() < deadline and not ids <= set(read_inference_log(server["log"]).column("request_id").to_pylist()):
        time.sleep(0.5)
    logged = {row["request_id"]: row["status"] for row in read_inference_log(server["log"]).to_pylist()}
    assert {i: logged.get(i) for i in ids} == {answer.headers["x-request-id"]: answer.status_code
                                               for answer in probes.values()}


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


def test_fuzzing_the_served_openapi_document_finds_no_server_error(server, tmp_path):
    """Schemathesis generates requests from the OpenAPI document the server publishes (valid ones
    and, in its coverage and fuzzing phases, ones that break the schema: wrong types, boundary and
    out-of-range numbers, odd strings) and sends each to the real server. No answer may be a 5xx and
    none may hang; the HAR file counts what was sent."""
    import subprocess
    import sys

    har = tmp_path / "fuzz.har"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server['url']}/openapi.json",
         "--header", f"Authorization: Bearer {API_KEY}", "--checks", "not_a_server_error",
         "--max-examples", "350", "--request-timeout", "60", "--seed", "1", "--workers", "1", "--no-color",
         "--suppress-health-check", "all", "--generation-database", "none", "--report", "har",
         "--report-har-path", str(har)],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = [entry["response"]["status"] for entry in entries]
    assert len(statuses) >= 1000 and max(statuses) < 500, (len(statuses), sorted(set(statuses)))


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
