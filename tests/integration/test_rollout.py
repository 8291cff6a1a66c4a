"""Rolling the served champion under continuous load: zero failed requests, old replicas gone.

Two tiny models are registered as real MLflow versions (no Ray Train: the run and its artifacts
are made directly), served by ``genloop serve``'s control plane, and the champion alias is moved
while eight clients keep sending requests.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from ray import serve

from services.config import GenloopConfig
from services.registry import MODEL_ARTIFACT, Registry
from services.serving_control import APP_NAME, start_serving
from serving.app import VERSION_HEADER


def register(config: GenloopConfig, folder) -> str:
    registry = Registry(config)
    run = registry.client.create_run(registry.experiment_id())
    registry.client.log_artifacts(run.info.run_id, str(folder), MODEL_ARTIFACT)
    registry.client.set_terminated(run.info.run_id, "FINISHED")
    return str(registry.register(run.info.run_id, tags={"dataset": "test:v1"}).version)


def test_champion_swap_under_load_fails_no_request(ray_cluster, genloop_config, make_tiny_model, tmp_path,
                                                    free_port):
    config = genloop_config
    config.serving.port = free_port
    config.serving.watch_interval_s = 0.5
    config.serving.max_batch_size = 8
    first = register(config, make_tiny_model(tmp_path / "a", seed=0))
    second = register(config, make_tiny_model(tmp_path / "b", seed=1))
    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", first)

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
            while len(results) < 100:
                time.sleep(0.1)
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
        assert sum(deployment.replica_states.values()) == 1  # the old replica is gone
    finally:
        stop.set()
        watcher.stop()
        serve.shutdown()
