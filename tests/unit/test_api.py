"""The OpenAI-compatible API layer in-process: the replica's ASGI app (``build_api``) over a fake
engine (tests/fake_engine.py), through Starlette's TestClient and the official openai client on it.

Request validation, error shapes, SSE framing, the OpenAI and vLLM parity rules, the inference log
and the metrics are the API layer's: no Ray Serve, no sockets and no model are needed to show them.
What needs those (Serve's proxy and backpressure, real connections, the HF engine) is in
tests/integration/test_serving_api.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from fake_engine import fake_api

from genloop.serving.inference_log import feedback_by_version, read_inference_log
from genloop.serving.protocol import VERSION_HEADER

API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("api") / "inference-log"
    with fake_api(api_keys=[API_KEY], inference_log_dir=str(log)) as (replica, http):
        yield {"http": http, "log": log, "replica": replica}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, max_retries=0, http_client=server["http"])


def log_rows(server, until: Callable[[list[dict]], bool] = lambda rows: True, seconds: float = 15) -> list[dict]:
    """The inference log's rows once ``until`` holds of them (or ``seconds`` have passed)."""
    deadline = time.time() + seconds
    while True:
        server["replica"].log.flush()
        rows = read_inference_log(server["log"]).to_pylist()
        if until(rows) or time.time() > deadline:
            return rows
        time.sleep(0.05)


def test_null_means_the_default_and_vllm_extensions_take_effect(client):
    """OpenAI's clients send null for "unset"; vLLM's clients send its sampling extensions."""
    nulls = {"temperature": None, "top_p": None, "n": None, "max_tokens": None, "stop": None, "seed": None,
             "user": None, "presence_penalty": None, "frequency_penalty": None, "logprobs": None, "echo": None,
             "stream": None, "stream_options": None, "best_of": None, "suffix": None, "logit_bias": None}
    defaulted = client.completions.create(model="genloop", prompt="The", **nulls)
    assert len(defaulted.choices) == 1 and 0 < defaulted.usage.completion_tokens <= 16  # max_tokens' 16
    chat = client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "Hi"}],
                                          temperature=None, max_tokens=None, max_completion_tokens=None, n=None,
                                          logprobs=None, top_logprobs=None, response_format=None, seed=None)
    assert len(chat.choices) == 1

    # min_tokens with ignore_eos fixes the length; top_k -1 is vLLM's "all tokens".
    extended = client.completions.create(model="genloop", prompt="The", max_tokens=6, seed=2, extra_body={
        "top_k": -1, "min_p": 0.2, "repetition_penalty": 1.3, "min_tokens": 6, "ignore_eos": True})
    assert extended.usage.completion_tokens == 6 and extended.choices[0].finish_reason == "length"


def test_chat_roles_and_text_parts_tokenize_and_token_id_prompts(client, server):
    http = server["http"]
    # developer is rendered as system, text parts joined by newlines, an assistant's null content as empty.
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": None}, {"role": "user", "content": "Go"}]
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                 {"role": "assistant", "content": ""}, {"role": "user", "content": "Go"}]
    counted = http.post("/tokenize", headers=AUTH, json={"model": "genloop", "messages": messages}).json()
    assert http.post("/tokenize", headers=AUTH, json={"messages": as_system}).json() == counted
    chat = client.chat.completions.create(model="genloop", messages=messages, max_tokens=3, temperature=0)
    assert chat.usage.prompt_tokens == counted["count"] == len(counted["tokens"])
    without_turn = http.post("/tokenize", headers=AUTH, json={"messages": as_system,
                                                              "add_generation_prompt": False}).json()
    assert without_turn["count"] < counted["count"]
    for bad, param in (({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                        "messages.0.content"), ({"role": "user", "content": None}, "messages.0.content"),
                       ({"role": "tool", "content": "x"}, "messages.0.role")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="genloop", messages=[bad], max_tokens=2)
        assert (refused.value.param, refused.value.body["code"]) == (param, 400), bad

    # A prompt as token ids is the same prompt as its text; the ids must be the vocabulary's.
    text = "The for statement"
    tokenized = http.post("/tokenize", headers=AUTH, json={"prompt": text}).json()
    assert tokenized["max_model_len"] == client.models.list().data[0].model_extra["max_model_len"] > 0
    ids = tokenized["tokens"]
    assert http.post("/detokenize", headers=AUTH, json={"tokens": ids}).json() == {"prompt": text}
    by_text = client.completions.create(model="genloop", prompt=text, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="genloop", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    several = client.completions.create(model="genloop", prompt=[ids, ids[:1]], max_tokens=2, temperature=0)
    assert sorted(c.index for c in several.choices) == [0, 1]
    for path, payload, status, param in (("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
                                         ("/tokenize", {"model": "genloop"}, 400, None),
                                         ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model")):
        answer = http.post(path, headers=AUTH, json=payload)
        assert (answer.status_code, answer.json()["error"]["param"], answer.json()["error"]["code"]) == (
            status, param, status), (path, payload)
    # The API's key guards them as it guards /v1 (vLLM leaves them open); /version names the release.
    assert http.post("/tokenize", json={"prompt": "x"}).status_code == 401
    assert http.get("/version", headers=AUTH).json() == {"version": importlib.metadata.version("genloop")}


def test_continuous_usage_and_vllm_benchmark_clients_requests(client, server):
    """stream_options.continuous_usage_stats puts each choice's usage so far in every chunk; the requests
    vLLM's benchmark clients send (this one's and an older one's) stream to the end."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model="genloop", prompt=["a", "b c"], max_tokens=4, stream=True,
                                            stream_options=options, extra_body={"ignore_eos": True}))
    per_choice: dict[int, list[tuple[int, int]]] = {}
    for chunk in chunks[:-1]:
        per_choice.setdefault(chunk.choices[0].index, []).append(
            (chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
    prompts = {i: per_choice[i][0][0] for i in per_choice}
    assert per_choice == {i: [(prompts[i], n) for n in (1, 2, 3, 4)] for i in (0, 1)}
    assert (chunks[-1].choices, chunks[-1].usage.completion_tokens) == ([], 8)
    chat = list(client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, stream=True, stream_options=options,
                                               extra_body={"ignore_eos": True}))
    assert [c.usage.completion_tokens for c in chat] == [0, 1, 2, 3, 3]  # role chunk, 3 tokens, the usage chunk
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].usage.prompt_tokens > 0

    http = server["http"]
    parts = [{"type": "text", "text": "The for statement"}]
    ids = http.post("/tokenize", headers=AUTH, json={"prompt": "The for statement"}).json()["tokens"]
    benchmark = {  # vllm/benchmarks/lib/endpoint_request_func.py, and benchmarks/backend_request_func.py before it
        "completions": {"prompt": "The for statement", "repetition_penalty": 1.0, "max_tokens": 5, "logprobs": None,
                        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True},
        "completions, token ids": {"prompt": ids, "repetition_penalty": 1.0, "max_tokens": 5, "logprobs": None,
                                   "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True},
        "chat/completions": {"messages": [{"role": "user", "content": parts}], "max_completion_tokens": 5,
                             "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True},
        "completions, older": {"prompt": "The for statement", "temperature": 0.0, "best_of": 1, "max_tokens": 5,
                               "logprobs": None, "stream": True},
        "chat/completions, older": {"messages": [{"role": "user", "content": parts}], "temperature": 0.0,
                                    "max_tokens": 5, "stream": True},
    }
    for name, payload in benchmark.items():
        with http.stream("POST", f"/v1/{name.split(',')[0]}", headers=AUTH,
                         json={"model": "genloop", **payload}) as response:
            assert response.status_code == 200, (name, response.read())
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]", name
        if "stream_options" in payload:
            assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 5, name


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

    with server["http"].stream("POST", "/v1/completions", headers=AUTH,
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
    ({"model": "genloop", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "genloop", "prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"model": "genloop", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # only with echo
    ({"model": "genloop", "prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"model": "genloop", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "genloop", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "genloop", "prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
    ({"model": "genloop", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": "genloop", "prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"model": "genloop", "prompt": [5, 100000]}, 400, "prompt"),
    ({"model": "genloop", "prompt": [[5], []]}, 400, "prompt"),
])
def test_bad_requests_get_openai_shaped_4xx(server, payload, status, param):
    response = server["http"].post("/v1/completions", json=payload, headers=AUTH)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] and error["code"] == status


def test_auth_body_size_and_json_errors(server):
    http = server["http"]
    assert http.post("/v1/completions", json={"model": "genloop", "prompt": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", max_retries=0, http_client=http).models.list()
    headers = {**AUTH, "Content-Type": "application/json"}
    assert http.post("/v1/completions", content=b"{not json", headers=headers).status_code == 400
    huge = http.post("/v1/completions", json={"model": "genloop", "prompt": "x" * 2_000_000}, headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["message"]


def test_every_request_lands_in_the_inference_log(client, server):
    client.completions.create(model="genloop", prompt="logged prompt", max_tokens=3, temperature=0, user="alice")
    ids = server["http"].post("/tokenize", headers=AUTH, json={"prompt": "prompt of token ids"}).json()["tokens"]
    client.completions.create(model="genloop", prompt=ids, max_tokens=2)  # logged as its text
    list(client.completions.create(model="genloop", prompt="streamed prompt", max_tokens=3, stream=True,
                                   temperature=0))  # greedy: a sampled eos would end it early
    rows = log_rows(server, lambda rows: {"logged prompt", "streamed prompt", "prompt of token ids"} <= {
        r["prompt"] for r in rows})
    assert "prompt of token ids" in [r["prompt"] for r in rows]
    streamed = next(r for r in rows if r["prompt"] == "streamed prompt")
    assert streamed["completion_tokens"] == 3 and streamed["ttft_seconds"] is not None
    row = next(r for r in rows if r["prompt"] == "logged prompt")
    assert row["model_version"] == "7" and row["status"] == 200 and row["completion_tokens"] == 3
    assert row["client_hash"] and row["client_hash"] != "alice"


def test_feedback_rates_a_response_and_joins_the_version_that_answered_it(client, server):
    http, url = server["http"], "/v1/feedback"
    rated = client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "Rate me"}],
                                           max_tokens=2)
    assert http.post(url, json={"id": rated.id, "rating": 1}).status_code == 401  # the API's keys, like /v1/*

    for payload, param in (({"id": "cmpl-123", "rating": 1}, "id"), ({"id": "req-" + rated.id, "rating": 1}, "id"),
                           ({"id": rated.id, "rating": 2}, "rating"), ({"id": rated.id}, "rating"),
                           ({"id": rated.id, "rating": True}, "rating"),
                           ({"id": rated.id, "rating": 1, "stars": 5}, "stars"),
                           ({"id": rated.id, "rating": 1, "comment": "x" * 5000}, "comment")):
        answer = http.post(url, json=payload, headers=AUTH)
        assert answer.status_code == 400, (payload, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], payload

    first = http.post(url, json={"id": rated.id, "rating": -1, "comment": "too short"}, headers=AUTH)
    assert first.status_code == 200 and first.json() == {"id": rated.id, "object": "feedback", "rating": -1}
    assert first.headers[VERSION_HEADER] == "7"
    assert http.post(url, json={"id": rated.id, "rating": 1}, headers=AUTH).status_code == 200  # changed mind

    log_rows(server, lambda rows: feedback_by_version(server["log"]) == {"7": {1: 1}})
    assert feedback_by_version(server["log"]) == {"7": {1: 1}}  # rated once, at its latest rating
    rows = [row for row in read_inference_log(server["log"]).to_pylist() if row["request_id"] == rated.id]
    assert [(row["route"], row["model_version"], row["status"], row["rating"], row["output"]) for row in rows] == [
        ("chat.completions", "7", 200, None, rated.choices[0].message.content),
        ("feedback", "", 200, -1, "too short"), ("feedback", "", 200, 1, "")]
    text = http.get("/metrics", headers=AUTH).text
    assert 'genloop_requests_total{finished_reason="none",model_version="7",route="feedback",status="200"} 2.0' in text


def test_feedback_without_an_inference_log_is_refused_not_lost():
    with fake_api(model_version="9") as (_, http):
        answer = http.post("/v1/feedback", json={"id": "cmpl-" + "0" * 24, "rating": 1})
    assert answer.status_code == 503 and "inference log" in answer.json()["error"]["message"]


def test_streaming_request_the_engine_refuses_is_a_4xx_not_a_200(server):
    response = server["http"].post("/v1/completions", headers=AUTH,
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


def test_echo_with_logprobs_scores_a_text_as_lm_evaluation_harness_asks(client):
    """lm-evaluation-harness's local-completions scores a continuation with echo, logprobs 1 and
    max_tokens 0 or 1, and sums token_logprobs after the context: the prompt's logprobs come first
    (the first null), each with the token itself among its top_logprobs. Streamed logprobs at
    temperature 0 are the same as whole ones."""
    text = "The for statement is used to iterate"
    scored = client.completions.create(model="genloop", prompt=text, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    choice = scored.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == scored.usage.prompt_tokens and "".join(logprobs.tokens) == text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp < 0 for lp in logprobs.token_logprobs[1:])
    assert all(top[token] == lp and len(top) <= 2 for token, lp, top in
               zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True))
    assert logprobs.text_offset == [text.index(t, o) for t, o in zip(logprobs.tokens, logprobs.text_offset,
                                                                      strict=True)]
    one_more = client.completions.create(model="genloop", prompt=text, max_tokens=1, echo=True, logprobs=1,
                                         temperature=0).choices[0]
    assert one_more.text.startswith(text)
    assert one_more.logprobs.token_logprobs[1:-1] == pytest.approx(logprobs.token_logprobs[1:])

    whole = client.completions.create(model="genloop", prompt="Lists are", max_tokens=5, logprobs=3, temperature=0)
    streamed = [c.choices[0] for c in client.completions.create(model="genloop", prompt="Lists are", max_tokens=5,
                                                                logprobs=3, temperature=0, stream=True)]
    expected = whole.choices[0].logprobs
    assert [lp for c in streamed for lp in c.logprobs.token_logprobs] == expected.token_logprobs
    assert [top for c in streamed for top in c.logprobs.top_logprobs] == expected.top_logprobs
    assert [offset for c in streamed for offset in c.logprobs.text_offset] == expected.text_offset


def test_chat_logprobs(client):
    chat = client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content if e.token != "<|endoftext|>") == chat.choices[0].message.content
    for entry in content:  # greedy: the token is the most likely; bytes spell its text
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        assert entry.top_logprobs[0].token == entry.token and bytes(entry.bytes).decode() == entry.token


def _metric(server, name: str, **labels: str) -> float:
    """The sum of the replica's samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = server["http"].get("/metrics", headers=AUTH).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_metrics_count_requests_by_route_status_and_version(client, server):
    route = {"route": "completions", "model_version": "7"}
    watched = {"answered": ("genloop_requests_total", {**route, "status": "200"}),
               "not found": ("genloop_requests_total", {**route, "status": "404", "finished_reason": "error"}),
               "first tokens": ("genloop_time_to_first_token_seconds_count", route),
               "gaps": ("genloop_inter_token_latency_seconds_count", route),
               "responses": ("genloop_request_generation_tokens_count", route),
               "tokens": ("genloop_request_generation_tokens_sum", route)}
    before = {key: _metric(server, name, **labels) for key, (name, labels) in watched.items()}
    # Two prompts × n=2 is one request of four sequences: one count, four first tokens, a gap per later token.
    several = client.completions.create(model="genloop", prompt=["count me", "and me"], n=2, max_tokens=3)
    server["http"].post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=AUTH)
    tokens = several.usage.completion_tokens
    assert {key: _metric(server, name, **labels) - before[key] for key, (name, labels) in watched.items()} == {
        "answered": 1, "not found": 1, "first tokens": 4, "gaps": tokens - 4, "responses": 1, "tokens": tokens}
    assert server["http"].get("/metrics").status_code == 401  # only /health is public once keys are set
    text = server["http"].get("/metrics", headers=AUTH).text
    assert 'genloop_model_info{model_version="7"} 1.0' in text
    assert "genloop_request_queue_time_seconds_bucket" in text and "genloop_requests_running" in text


def test_hostile_inputs_get_a_clear_4xx_and_are_logged(server):
    """Each input once gave a 500 or a silent empty success; now a 4xx naming the problem, and a row."""
    headers = {**AUTH, "content-type": "application/json"}
    completion = {"model": "genloop", "prompt": "x", "max_tokens": 2}
    chat = {"model": "genloop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def post(path: str, payload: dict | None = None, raw: Any = None) -> Any:
        return server["http"].post(f"/v1/{path}", headers=headers,
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

    seeded = post("completions", {**completion, "seed": 2**63 - 1, "n": 2, "temperature": 1})
    assert seeded.status_code == 200 and len(seeded.json()["choices"]) == 2  # seed + 1 wraps, as int64 would

    ids = {answer.headers["x-request-id"] for answer in probes.values()}
    rows = log_rows(server, lambda rows: ids <= {row["request_id"] for row in rows})
    logged = {row["request_id"]: row["status"] for row in rows}
    assert {i: logged.get(i) for i in ids} == {answer.headers["x-request-id"]: answer.status_code
                                               for answer in probes.values()}
