"""`genloop up` end to end: the service in a subprocess on loopback ports, from empty state.

One state folder, two starts, as an operator lives it: the first start bootstraps a champion
(ingest → train → gate → promote) while /health says "bootstrapping"; a second `genloop up` on
the same state is refused; the admin API checks its tokens (401, 403), promotes and rolls back under
client load with no failed request, and queues a retrain (202, then 409 while it runs) whose
stages it shows; a rating on an answer joins the inference log and moves the feedback metric; SIGTERM
during the retrain's training exits 0 and the next start on the existing champion finds the run
recorded as interrupted. Tiny settings keep each training to a few dozen small steps.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from genloop.services.audit import AuditLog
from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry

pytestmark = pytest.mark.slow


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Up:
    """`genloop up` in a subprocess, its output read all along (a full pipe would block it)."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "genloop.services.cli", "up"], env=env, cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def alive(self) -> None:
        assert self.process.poll() is None, self.output

    def stop(self, timeout: float = 180) -> str:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(timeout=30)
        return self.output


def wait_until(condition, timeout: float, what: str, up: Up | None = None, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up is not None:
            up.alive()
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{up.output[-6000:]}" if up else ""))


class Load:
    """Clients sending completions back to back; every answer that is not a 200 is a failure."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.stop_flag = url, threading.Event()
        self.versions: dict[str, int] = {}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client, i) for i in range(clients)]

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=120) as client:
            sent = 0
            while not self.stop_flag.is_set() and sent < 2000:  # bounded, whatever happens
                sent += 1
                try:
                    response = client.post(f"{self.url}/v1/completions", json={
                        "model": "genloop", "prompt": f"Client {index} asks {sent}", "max_tokens": 4})
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(repr(exc))
                    continue
                with self.lock:
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        version = response.headers["x-genloop-model-version"]
                        self.versions[version] = self.versions.get(version, 0) + 1

    def latest(self) -> dict[str, int]:
        with self.lock:
            return dict(self.versions)

    def finish(self) -> None:
        self.stop_flag.set()
        for future in self.futures:
            future.result(timeout=180)
        self.pool.shutdown()


def new_documents(count: int) -> list[str]:
    """Paragraphs of the standard library's source: text the bootstrap corpus (Python's docs) lacks."""
    import argparse
    import json as json_module
    import logging

    texts = []
    for module in (argparse, json_module, logging, inspect):
        texts += [part for part in inspect.getsource(module).split("\n\n") if len(part) >= 200]
    return texts[:count]


def test_up_bootstraps_serves_is_steered_and_stops_cleanly(tmp_path: Path, make_tiny_model, register_model):
    home, incoming = tmp_path / "home", tmp_path / "incoming"
    incoming.mkdir()
    serving_port, admin_port = free_port(), free_port()
    ops, ci = secrets.token_hex(16), secrets.token_hex(16)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GENLOOP_", "RAY_"))}
    env.update({
        "GENLOOP_HOME": str(home), "GENLOOP_ADMIN_TOKEN": f"ops:{ops},ci:{ci}", "COLUMNS": "200",
        "GENLOOP_RAY__NUM_CPUS": "2", "GENLOOP_SERVING__PORT": str(serving_port),
        "GENLOOP_SERVICE__ADMIN_PORT": str(admin_port), "GENLOOP_SERVICE__SHUTDOWN_GRACE_S": "2",
        "GENLOOP_MONITORING__EXPORTER_PORT": "0", "GENLOOP_SERVING__REPLICA_CPUS": "0.25",
        "GENLOOP_SERVING__WATCH_INTERVAL_S": "2", "GENLOOP_SERVING__INFERENCE_LOG_FLUSH_S": "0.2",
        # A tiny first model: a few dozen small steps on a few hundred documents.
        "GENLOOP_DATA__MAX_DOCUMENTS_PER_SOURCE": "400", "GENLOOP_TOKENIZER__VOCAB_SIZE": "512",
        "GENLOOP_TRAIN__MAX_STEPS": "20", "GENLOOP_TRAIN__EVAL_EVERY": "10", "GENLOOP_TRAIN__WARMUP_STEPS": "2",
        "GENLOOP_TRAIN__BLOCK_SIZE": "64", "GENLOOP_TRAIN__MICRO_BATCH_SIZE": "8", "GENLOOP_TRAIN__NUM_WORKERS": "1",
        "GENLOOP_TRAIN__CPUS_PER_WORKER": "0.25", "GENLOOP_EVALUATION__MAX_TEXTS": "20",
        "GENLOOP_EVALUATION__PROMPTS": "4", "GENLOOP_GATE__LIVE_PROMPTS": "0",
        # The retrain: new documents from the watched folder, on a budget long enough to be interrupted.
        "GENLOOP_SCHEDULER__INCOMING": str(incoming), "GENLOOP_SCHEDULER__INCOMING_SETTLE_S": "0",
        "GENLOOP_SCHEDULER__MIN_NEW_DOCUMENTS": "10", "GENLOOP_SCHEDULER__RETRAIN_BUDGET": "500",
        "GENLOOP_SCHEDULER__RETRAIN_CRON": "0 0 1 1 *",
    })
    serving, admin = f"http://127.0.0.1:{serving_port}", f"http://127.0.0.1:{admin_port}/admin"
    as_ops, as_ci = {"Authorization": f"Bearer {ops}"}, {"Authorization": f"Bearer {ci}"}
    config = GenloopConfig(home=home)
    figures = {}

    # --- first start, empty state: bootstrap ---------------------------------------------------------
    up = Up(env, tmp_path)
    try:
        jobs = wait_until(lambda: httpx.get(f"{admin}/jobs", headers=as_ops, timeout=5).json(), 120,
                          "the admin API", up)
        bootstrap = jobs[0]
        assert (bootstrap["job"], bootstrap["reason"]) == ("retrain", "bootstrap")

        second = subprocess.run([sys.executable, "-m", "genloop.services.cli", "up"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "genloop up already runs on" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr

        assert httpx.get(f"{admin}/jobs", timeout=5).status_code == 401
        wrong = httpx.get(f"{admin}/jobs", headers={"Authorization": "Bearer not-a-token"}, timeout=5)
        assert wrong.status_code == 403 and "error" in wrong.json()
        assert httpx.post(f"{admin}/retrain", timeout=5).status_code == 401

        health = wait_until(lambda: (r := httpx.get(f"{serving}/health", timeout=5)).status_code != 404 and r, 180,
                            "/health", up)
        if health.status_code == 503:  # still training: it says so
            assert health.json()["status"] == "bootstrapping"
        busy = httpx.post(f"{admin}/retrain", headers=as_ops, timeout=10)
        if busy.status_code == 409:  # the bootstrap is a retrain, one at a time
            assert busy.json()["running"] == bootstrap["id"]

        def answered() -> httpx.Response | None:
            response = httpx.post(f"{serving}/v1/completions", timeout=60,
                                  json={"model": "genloop", "prompt": "The list", "max_tokens": 8})
            return response if response.status_code == 200 else None

        first = wait_until(answered, 900, "the bootstrapped champion to answer", up, every=1)
        figures["empty state → first answer (s)"] = round(time.monotonic() - up.started, 1)
        assert first.headers["x-genloop-model-version"] == "1"
        detail = httpx.get(f"{admin}/jobs/{bootstrap['id']}", headers=as_ci, timeout=10).json()
        assert detail["outcome"] == "promoted", detail
        assert [s["stage"] for s in detail["stages"]] == ["ingest", "prepare", "train", "gate", "promoted"]
        assert detail["mlflow_run_id"] and detail["reports"]
        page = httpx.get(f"http://127.0.0.1:{admin_port}{detail['reports'][0]}", headers=as_ci, timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        escape = httpx.get(f"{admin}/reports/..%2F..%2Fgenloop.db", headers=as_ci, timeout=10)
        assert escape.status_code == 404

        # --- feedback joins the log and moves the metric -------------------------------------------
        rated = httpx.post(f"{serving}/v1/feedback", timeout=10,
                           json={"id": first.json()["id"], "rating": 1, "comment": "good"})
        assert rated.status_code == 200, rated.text

        def liked() -> bool:
            models = httpx.get(f"{admin}/models", headers=as_ci, timeout=30).json()
            return next(m for m in models if m["version"] == "1")["positive_share"] == 1.0

        wait_until(liked, 60, "the rating in /admin/models", up)
        target = json.loads((config.scrape_targets_dir / "control-plane.json").read_text())[0]["targets"][0]
        wait_until(lambda: re.search(r'genloop_feedback_positive_ratio\{model_version="1"\} 1\.0',
                                     httpx.get(f"http://{target}/metrics", timeout=10).text), 60,
                   "the feedback metric", up)

        # --- promote and roll back over HTTP under load: no failed request ----------------------------
        other = register_model(config, make_tiny_model(), tags={"dataset": "other:v1"})
        load = Load(serving)
        try:
            wait_until(lambda: load.latest().get("1", 0) >= 3, 120, "load on v1", up)
            refused = httpx.post(f"{admin}/promote/{other}", headers=as_ops, json={"force": True}, timeout=30)
            assert refused.status_code == 400 and "--reason" in refused.json()["error"]["message"]
            assert httpx.post(f"{admin}/promote/99", headers=as_ops, json={"force": True, "reason": "x"},
                              timeout=30).status_code == 404
            promoted = httpx.post(f"{admin}/promote/{other}", headers=as_ops, timeout=60,
                                  json={"force": True, "reason": "e2e: hotfix"})
            assert promoted.status_code == 200 and promoted.json()["champion"] == other, promoted.text
            wait_until(lambda: load.latest().get(other, 0) >= 3, 240, f"v{other} answering", up)
            back = httpx.post(f"{admin}/rollback", headers=as_ci, json={"reason": "e2e: back"}, timeout=60)
            assert back.status_code == 200 and back.json()["champion"] == "1"
            served_before = load.latest().get("1", 0)
            wait_until(lambda: load.latest().get("1", 0) >= served_before + 3, 240, "v1 answering again", up)

            # --- a retrain: 202, 409 while it runs, its stages; then SIGTERM during training --------
            (incoming / "code.jsonl").write_text(
                "".join(json.dumps({"text": text}) + "\n" for text in new_documents(60)), encoding="utf-8")
            accepted = httpx.post(f"{admin}/retrain", headers=as_ops, json={"reason": "e2e"}, timeout=30)
            assert accepted.status_code == 202, accepted.text
            run_id = accepted.json()["id"]
            again = httpx.post(f"{admin}/retrain", headers=as_ci, timeout=30)
            assert again.status_code == 409 and again.json()["running"] == run_id
            training = wait_until(lambda: (d := httpx.get(f"{admin}/jobs/{run_id}", headers=as_ops, timeout=10)
                                           .json())["stage"] == "train" and d["mlflow_run_id"] and d, 300,
                                  "the retrain's training", up)
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.latest().get(other, 0) > 0 and load.latest().get("1", 0) > 0
        actions = [(e.actor, e.action, e.outcome) for e in AuditLog(config.state_db).history()]
        assert ("ops", "force-promote", "promoted") in actions and ("ci", "rollback", "rolled-back") in actions
        assert ("ops", "retrain", "queued") in actions

        output = up.stop()
    finally:
        if up.process.poll() is None:
            up.process.kill()
    assert up.process.returncode == 0, output
    assert "interrupted during its train stage" in output and "Traceback" not in output, output
    run = Registry(config).client.get_run(training["mlflow_run_id"])
    assert run.info.status == "KILLED"

    # --- second start: the existing champion, the interrupted run as it was left -------------------
    again_up = Up(env, tmp_path)
    try:
        wait_until(answered, 300, "the champion to answer after a restart", again_up, every=0.5)
        figures["existing champion → first answer (s)"] = round(time.monotonic() - again_up.started, 1)
        interrupted = httpx.get(f"{admin}/jobs/{run_id}", headers=as_ops, timeout=10).json()
        assert interrupted["outcome"] == "failed" and "interrupted" in interrupted["detail"]
        drift = httpx.get(f"{admin}/drift", headers=as_ops, timeout=10)
        assert drift.status_code == 404  # no drift check has run: said, not an empty 200
        output = again_up.stop()
    finally:
        if again_up.process.poll() is None:
            again_up.process.kill()
    assert again_up.process.returncode == 0, output
    print(json.dumps(figures))
