"""Rolling the served champion under continuous load: zero failed requests, old replicas gone.

Two tiny models are registered as real MLflow versions (no Ray Train: ``register_model`` makes
the run and its artifacts directly), served by ``genloop serve``'s control plane on replicas Serve
autoscales, and the champion alias is moved while eight clients keep sending requests.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve

from genloop.services.registry import Registry
from genloop.services.serving_control import APP_NAME, start_serving
from genloop.serving.protocol import VERSION_HEADER
from genloop.serving.settings import Autoscaling


@pytest.fixture
def two_versions(genloop_config, make_tiny_model, register_model, tmp_path, free_port):
    """Two registered tiny models (different seeds), the first one champion; serving on a free port."""
    config = genloop_config
    config.serving.port = free_port
    first = register_model(config, make_tiny_model(seed=0))
    second = register_model(config, make_tiny_model(seed=1))
    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", first)
    return config, first, second


def test_champion_swap_under_load_on_autoscaled_replicas_fails_no_request(ray_cluster, two_versions, free_port):
    config, first, second = two_versions
    config.serving.watch_interval_s = 0.5
    config.serving.max_batch_size = 8
    # Eight clients against a target of two requests per replica: Serve scales to the maximum, two.
    config.serving.autoscaling = Autoscaling(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                             upscale_delay_s=0, downscale_delay_s=600)
    config.serving.replica_cpus = 0.25  # two replicas of each version fit the test's Ray during the swap
    registry = Registry(config)

    def running() -> int:
        return serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states.get("RUNNING", 0)

    watcher = start_serving(config)
    url = f"http://127.0.0.1:{free_port}/v1/completions"
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    response = http.post(url, json={"model": "genloop", "prompt": "The list", "max_tokens": 4})
                    outcome = (response.status_code, response.headers.get(VERSION_HEADER))
                except httpx.HTTPError as exc:
                    outcome = (0, repr(exc))
                with lock:
                    results.append(outcome)

    try:
        with ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(client)
            deadline = time.time() + 180
            while (len(results) < 100 or running() < 2) and time.time() < deadline:
                time.sleep(0.1)
            assert running() == 2, serve.status().applications[APP_NAME].deployments[APP_NAME]
            registry.client.set_registered_model_alias(registry.name, "champion", second)
            deadline = time.time() + 240
            while time.time() < deadline:
                with lock:
                    after = [v for _, v in results if v == second]
                    total = len(results)
                if total >= 500 and len(after) >= 100:
                    break
                time.sleep(0.2)
            stop.set()
        failures = [r for r in results if r[0] != 200]
        assert not failures, failures[:5]
        assert len(results) >= 500
        versions = [v for _, v in results]
        assert versions[0] == first and set(versions[-50:]) == {second}
        deployment = serve.status().applications[APP_NAME].deployments[APP_NAME]
        assert sum(deployment.replica_states.values()) <= 2  # the old replicas are gone
    finally:
        stop.set()
        watcher.stop()
        serve.shutdown()


def test_challenger_in_shadow_answers_a_mirrored_share_into_the_log_only(ray_cluster, two_versions, free_port):
    from genloop.services.lifecycle import set_challenger
    from genloop.serving.inference_log import read_inference_log

    config, champion, challenger = two_versions
    config.serving.watch_interval_s = 3600  # rolled by hand below
    config.serving.shadow_percent = 50
    config.serving.replica_cpus = 0.5
    set_challenger(config, challenger, reason="try it")

    watcher = start_serving(config)
    url = f"http://127.0.0.1:{free_port}/v1/completions"
    try:
        assert watcher.serving.challenger == challenger
        ids = []
        for i in range(10):
            response = httpx.post(url, json={"model": "genloop", "prompt": f"prompt {i}", "max_tokens": 4},
                                  timeout=60)
            assert response.status_code == 200 and response.headers[VERSION_HEADER] == champion
            ids.append(response.json()["id"])
        deadline = time.time() + 30
        while time.time() < deadline:
            rows = read_inference_log(config.inference_log_dir).to_pylist()
            shadow = [r for r in rows if r["shadow"]]
            if len(shadow) >= 5 and len(rows) >= 15:
                break
            time.sleep(0.5)
        assert len(shadow) == 5  # exactly 50 %
        assert {r["model_version"] for r in shadow} == {challenger}
        assert {r["request_id"] for r in shadow} <= set(ids)  # joins with the champion's answer
        assert all(r["status"] == 200 and r["completion_tokens"] > 0 for r in shadow)
        assert {r["model_version"] for r in rows if not r["shadow"]} == {champion}

        set_challenger(config, None)
        assert watcher.check_once() and watcher.serving.challenger is None
        deployments = serve.status().applications[APP_NAME].deployments
        assert "shadow" not in deployments
        assert httpx.post(url, json={"model": "genloop", "prompt": "x", "max_tokens": 2},
                          timeout=60).status_code == 200
    finally:
        watcher.stop()
        serve.shutdown()
