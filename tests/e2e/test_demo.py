"""The README's main job, `genloop demo`, end to end in a subprocess with a relative GENLOOP_HOME.

This is the command a new user runs first, and the loop's core promise on a real domain shift: v1
learns Python's docs; same-domain traffic is no drift; traffic and new documents from Python's
source code are; the retrain (replay, budget) passes the gate and is rolled out under that traffic.
It runs at ``--size small``: every stage, the same code path and the same training as ``make demo``,
scored on fewer held-out texts; the full size's figures are benchmarks/demo_loop.py's.
It once failed only because Ray workers resolved the relative default home against their own
working directory, which no in-process test saw.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from genloop.services.config import GenloopConfig
from genloop.services.evaluation_report import EvaluationReport
from genloop.services.lifecycle import roles
from genloop.services.registry import Registry
from genloop.services.scheduler import JobHistory
from genloop.serving.inference_log import read_inference_log
from genloop.training.cost import logged_cost
from genloop.training.dataset_store import resolve_dataset

pytestmark = pytest.mark.slow

# What the libraries and Ray's processes printed on a newcomer's console before it went to the log.
LIBRARY_NOISE = ("(raylet)", "pid=", "TrainingReport", "Creating initial MLflow", "Execution plan",
                 "execution finished", "Progress bars disabled", "Token authentication", "loss_type",
                 "Warning:", "INFO ", "WARNING ")


def test_demo_adapts_to_a_domain_shift(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GENLOOP_HOME": "state", "GENLOOP_RAY__NUM_CPUS": "2", "COLUMNS": "160",
           "GENLOOP_SERVING__PORT": str(port)}
    result = subprocess.run([sys.executable, "-m", "genloop.services.cli", "demo", "--size", "small"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=1800)
    failure = [line for line in result.stderr.splitlines() if "demo failed" in line]
    assert result.returncode == 0, failure or result.stderr[-3000:]
    assert "genloop demo: what happened" in result.stdout, result.stdout[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout  # the "what next" block

    # The console is genloop's own: what Ray's processes and the libraries print is in the run's log.
    printed = result.stdout + result.stderr
    (tmp_path / "console.txt").write_text(printed)  # what a newcomer saw, to read when this fails
    noise = [pattern for pattern in LIBRARY_NOISE if pattern in printed]
    assert not noise, [line for line in printed.splitlines() if any(p in line for p in noise)][:10]
    (log,) = (tmp_path / "state" / "logs").glob("*-demo-*.log")
    assert f"Ray and library logs: {log}" in result.stderr
    assert all(pattern in log.read_text() for pattern in ("TrainingReport", "Started a local Ray instance"))

    config = GenloopConfig(home=tmp_path / "state")
    registry = Registry(config)
    v1, v2 = registry.versions()
    assert v2.tags["parent_version"] == str(v1.version) and v2.tags["dataset"] == "live-mix:v1"
    assert roles(config).champion == str(v2.version)  # promoted by the gate, no --force
    replay = resolve_dataset(config.datasets_dir, "live-mix:v1").manifest["replay"]
    assert replay["versions"] == ["python-docs:v1"] and replay["documents"] > 0

    report = EvaluationReport.model_validate_json(
        (config.reports_dir / "evaluations" / f"{v2.tags['evaluation_report']}.json").read_text())
    bits = {name: {who: m.bits_per_byte for who, m in by.items()} for name, by in report.metrics.items()}
    # The new domain is learnt and the old one kept (small: 21.0 % better and 0.4 % better measured).
    assert bits["current"]["candidate"] <= 0.85 * bits["current"]["champion"], bits  # new domain ≥ 15 % better
    assert bits["reference"]["candidate"] <= 1.02 * bits["reference"]["champion"], bits  # old ≤ 2 % worse
    assert report.passed and set(report.weights) == {"current", "reference"} and "live" in report.sets

    assert logged_cost(registry.client.get_run(v2.run_id).data.metrics).compute_ratio <= 0.2 + 1e-9

    drift = [run for run in reversed(JobHistory(config.scheduler_db).recent()) if run.job == "drift"]
    assert [run.outcome for run in drift] == ["no drift", "drift"], [run.detail for run in drift]

    served = read_inference_log(config.inference_log_dir)
    assert set(served.column("status").to_pylist()) == {200}  # nothing failed, the swap included
    assert str(v2.version) in set(served.column("model_version").to_pylist())
    assert "requests failed" in result.stdout and "│ 0 " in result.stdout.split("requests failed")[1][:40]
