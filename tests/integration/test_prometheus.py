"""A real Prometheus (the Debian package, on loopback) scrapes a live genloop with two Serve replicas and
the control plane; after real traffic, a real gate and a drift check run by the real scheduler, every dashboard panel's
query must return series through Prometheus's HTTP API (Ray Serve's panels aside: Ray is not scraped
here), the generated rules must evaluate over them, and the per-replica counters must add up to
exactly the requests sent, each request once."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time

import httpx
import openai
import pytest

from genloop.monitoring import alerts, dashboards
from genloop.services.exporter import start_exporter
from genloop.services.gate import evaluate
from genloop.services.lifecycle import promote
from genloop.services.registry import Registry
from genloop.services.scheduler import ACTIVE, GenloopScheduler
from genloop.services.serving_control import start_serving, stop_serving
from genloop.serving.inference_log import read_inference_log
from genloop.training.cost import cost_report

pytestmark = pytest.mark.slow


def _query(prometheus: str, expr: str) -> list:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    assert response.status_code == 200, (expr, response.text)
    return response.json()["data"]["result"]


def _value(prometheus: str, expr: str) -> float | None:
    result = _query(prometheus, expr)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(genloop_config, tmp_path, free_port):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: `make test` installs it (apt-get install prometheus)")
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps({  # JSON is YAML; the scrape job is the one deploy/ ships, faster
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(alerts.OUT_FILE)],
        "scrape_configs": [{"job_name": "genloop", "file_sd_configs": [
            {"files": [str(genloop_config.scrape_targets_dir / "*.json")], "refresh_interval": "1s"}]}],
    }))
    process = subprocess.Popen([binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{free_port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{free_port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_prometheus_scrapes_every_replica_and_every_panel_has_data(
        ray_cluster, genloop_config, make_tiny_model, register_model, make_docs_dataset, tmp_path, prometheus):
    config = genloop_config
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        config.serving.port = sock.getsockname()[1]
    config.serving.num_replicas = 2
    config.serving.replica_cpus = 0.5
    config.serving.watch_interval_s = 3600
    config.monitoring.exporter_port = 0
    config.monitoring.drift_min_samples = 20
    config.monitoring.drift_max_samples = 60
    config.evaluation.max_texts = 10
    config.evaluation.prompts = 4
    config.evaluation.max_new_tokens = 16
    make_docs_dataset(config)
    registry = Registry(config)
    version = register_model(config, make_tiny_model())
    registry.client.set_model_version_tag(registry.name, version, "dataset", "docs:v1")
    run_id = registry.client.get_model_version(registry.name, version).run_id
    cost = cost_report(wall_seconds=42.0, train_seconds=40.0, device_type="cpu", device_count=1, parameters=1000,
                       tokens_seen=10_000, timed_tokens=10_000, prices=config.cost, initial_compute_flops=None)
    for key, value in {**cost.mlflow_metrics(), "best_val_loss": 5.1}.items():
        registry.client.log_metric(run_id, key, value)
    failed = registry.client.create_run(registry.experiment_id())
    registry.client.set_terminated(failed.info.run_id, "FAILED")
    evaluate(config, version)  # the real gate writes the report the exporter reads
    promote(config, version, force=True, reason="first model", actor="test")

    config.scheduler.drift_interval = None  # run on demand below; the cron job gives a next run time
    config.scheduler.retrain_on_drift = False
    scheduler = GenloopScheduler(config)
    scheduler.start()
    watcher = exporter = None
    try:
        watcher = start_serving(config)
        exporter = start_exporter(config)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{config.serving.port}/v1", api_key="x", max_retries=0)
        # Each request counts once, however many prompts and choices it has.
        client.completions.create(model="genloop", prompt=["One statement is", "Another is"], n=2, max_tokens=8)
        sent = 1
        for i in range(23):
            answer = client.completions.create(model="genloop", prompt=f"The statement {i} is", max_tokens=8)
            sent += 1
        rated = httpx.post(f"http://127.0.0.1:{config.serving.port}/v1/feedback", json={"id": answer.id, "rating": 1})
        assert rated.status_code == 200, rated.text
        sent += 1
        for i in range(4):
            list(client.chat.completions.create(model="genloop", messages=[{"role": "user", "content": f"Hi {i}"}],
                                                max_tokens=6, stream=True))
            sent += 1
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x")
        sent += 1
        deadline = time.time() + 30  # replicas write the inference log in batches, every 2 s
        # A row per choice: the first request's four choices are three more rows than requests.
        while time.time() < deadline and len(read_inference_log(config.inference_log_dir)) < sent + 2:
            time.sleep(0.5)
        scheduler.run_now("drift")
        deadline = time.time() + 180
        while time.time() < deadline and not [r for r in scheduler.history.recent()
                                              if r.outcome not in ACTIVE]:
            time.sleep(0.5)
        drift_run = scheduler.history.recent()[0]
        assert drift_run.outcome in ("drift", "no drift"), drift_run.detail  # on the prompts just logged

        deadline = time.time() + 60
        while time.time() < deadline and _value(prometheus, "sum(genloop_requests_total)") != sent:
            time.sleep(1)
        assert _value(prometheus, "sum(genloop_requests_total)") == sent  # every replica, each counted once
        assert _value(prometheus, 'count(up{component="genloop"} == 1)') == 2
        assert _value(prometheus, "sum(genloop_model_info)") == 2
        for recorded in ("genloop_drift_last_run_timestamp_seconds", "sum(genloop_scheduler_job_runs_total)",
                         "genloop_feedback_positive_ratio"):
            while time.time() < deadline and _value(prometheus, recorded) is None:  # the exporter caches 10 s
                time.sleep(1)

        # The SLO's recording rules see the replicas' series: the bucket they name is one the histogram has.
        slow = "genloop:slo_slow_first_tokens_per_sequence:ratio_rate5m"
        while time.time() < deadline and _value(prometheus, slow) is None:
            time.sleep(1)
        assert _value(prometheus, slow) is not None

        empty = []
        for name, text in dashboards.render().items():
            for panel in json.loads(text)["panels"]:
                for target in panel.get("targets", []):
                    if "ray_serve_" in target["expr"]:
                        continue  # Ray Serve's own series: this Prometheus scrapes genloop's targets only
                    # The dashboard's variables at "All", as Grafana sends them.
                    expr = re.sub(r"\$(model_version|replica|route)\b", ".*",
                                  target["expr"].replace("$__rate_interval", "2m"))
                    if not _query(prometheus, expr):
                        empty.append((name, panel["title"], expr))
        assert not empty, "\n".join(f"{n}: {t}: {e}" for n, t, e in empty)
    finally:
        scheduler.stop()
        if exporter is not None:
            exporter.close()
        if watcher is not None:
            watcher.stop()
            stop_serving(own_cluster=True)
