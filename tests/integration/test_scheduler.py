"""The scheduler on a real APScheduler with its SQLite job store, real Ray Train and the real gate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitoring.metrics import ControlPlaneCollector
from services.config import GenloopConfig, UserInputError
from services.exporter import read_state
from services.registry import Registry
from services.scheduler import GenloopScheduler, JobHistory
from serving.inference_log import InferenceLog, InferenceRecord


def next_runs(config) -> dict[str, float | None]:
    return {job.job: job.next_run for job in JobHistory(config.scheduler_db).summary()}


def wait_for_runs(history: JobHistory, count: int, timeout: float = 600) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [run for run in history.recent(50) if run.outcome != "running"]
        if len(runs) >= count:
            return runs
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} finished runs: {history.recent(50)}")


def drift_failures(history: JobHistory) -> list:
    return [run for run in history.recent(100) if run.job == "drift" and run.outcome == "failed"]


def test_jobs_persist_across_restarts_and_follow_the_config(genloop_config):
    config = genloop_config
    config.scheduler.retrain_cron = "0 3 * * *"
    config.scheduler.drift_interval = None
    scheduler = GenloopScheduler(config)
    scheduler.start()
    try:
        with pytest.raises(UserInputError, match="another genloop scheduler"):
            with GenloopScheduler(config).exclusive():
                pass
    finally:
        scheduler.stop()
    first = next_runs(config)
    assert set(first) == {"retrain"}
    assert datetime.fromtimestamp(first["retrain"], UTC).strftime("%H:%M") == "03:00"

    restarted = GenloopScheduler(config)
    restarted.start()
    restarted.stop()
    assert next_runs(config) == first  # the stored job was kept, not re-created

    config.scheduler.retrain_cron = "30 4 * * 1"
    config.scheduler.drift_interval = timedelta(hours=2)
    changed = GenloopScheduler(config)
    changed.start()
    changed.stop()
    runs = next_runs(config)
    assert datetime.fromtimestamp(runs["retrain"], UTC).strftime("%a %H:%M") == "Mon 04:30"
    assert 0 < runs["drift"] - time.time() <= 2 * 3600

    config.scheduler.drift_interval = None
    dropped = GenloopScheduler(config)
    dropped.start()
    dropped.stop()
    assert set(next_runs(config)) == {"retrain"}


def test_a_failing_job_is_recorded_and_the_schedule_goes_on(genloop_config):
    """Drift with no champion fails every 1 s; each run is recorded as failed and reported to Prometheus."""
    config = genloop_config
    config.scheduler.retrain_cron = None
    config.scheduler.drift_interval = timedelta(seconds=1)
    crashed = JobHistory(config.scheduler_db).started("retrain", "schedule")  # its process died mid-run
    scheduler = GenloopScheduler(config)
    scheduler.start()
    try:
        deadline = time.time() + 120  # a run slower than the 1 s interval makes the next one "skipped"
        while len(drift_failures(scheduler.history)) < 2 and time.time() < deadline:
            time.sleep(0.2)
    finally:
        scheduler.stop()
    runs = scheduler.history.recent(100)
    [interrupted] = [run for run in runs if run.id == crashed]
    assert (interrupted.outcome, interrupted.detail) == ("failed", "interrupted: the process running it stopped")
    failed = drift_failures(scheduler.history)
    assert len(failed) >= 2 and all("no champion" in run.detail for run in failed)
    assert {run.outcome for run in runs if run.job == "drift"} <= {"failed", "skipped"}
    registry = CollectorRegistry()
    registry.register(ControlPlaneCollector(lambda: read_state(config)))
    text = generate_latest(registry).decode()
    assert f'genloop_scheduler_job_runs_total{{job="drift",outcome="failed"}} {float(len(failed))}' in text
    assert 'genloop_scheduler_next_run_timestamp_seconds{job="drift"}' in text


@pytest.mark.slow
def test_retrain_promotes_new_data_skips_old_data_and_drift_starts_it(genloop_config, ray_cluster):
    config = genloop_config
    config.scheduler.retrain_cron = None
    config.scheduler.drift_interval = None
    config.scheduler.sources = ["builtin:python-docs"]
    config.data.max_documents_per_source = 600
    config.tokenizer.vocab_size = 512
    config.train.max_steps = 10
    config.train.eval_every = 5
    config.train.eval_batches = 2
    config.train.micro_batch_size = 8
    config.train.warmup_steps = 2
    config.evaluation.max_texts = 10
    config.evaluation.prompts = 4
    config.evaluation.max_new_tokens = 8
    config.gate.ceilings = {"perplexity": 1e9}  # the first model is judged by the bounds alone
    config.monitoring.drift_min_samples = 20
    config.monitoring.drift_max_samples = 80

    scheduler = GenloopScheduler(config)
    scheduler.start()
    try:
        scheduler.run_now("retrain")
        scheduler.run_now("retrain")  # same sources, same content: nothing new to train on
        wait_for_runs(scheduler.history, 2)
        champion = Registry(config).alias_version("champion")
        log = InferenceLog(config.inference_log_dir)
        for i in range(60):  # traffic that is Python code, not prose: drift
            log.append(InferenceRecord(request_id=f"r{i}", route="completions", model_version="1", status=200,
                                       prompt=f"def handler_{i}(request):\n    return {{'id': {i}, 'ok': [x ** 2 for "
                                              f"x in range({i})]}}  # {i * 7:x}"))
        log.close()
        scheduler.run_now("drift")
        runs = wait_for_runs(scheduler.history, 4)
    finally:
        scheduler.stop()

    first, second, drift, after_drift = sorted(runs, key=lambda run: run.id)
    assert (first.job, first.outcome) == ("retrain", "promoted"), first.detail
    assert champion is not None and champion.tags["dataset"] == "live:v1"
    assert (second.outcome, second.detail) == ("skipped", "no new data: champion v1 was trained on live:v1")
    assert second.started_at >= first.finished_at  # one run at a time
    assert (drift.job, drift.outcome) == ("drift", "drift"), drift.detail
    assert (after_drift.job, after_drift.reason, after_drift.outcome) == ("retrain", "drift", "skipped")
    assert Registry(config).alias_version("champion").version == champion.version


def test_a_round_the_gate_already_refused_is_not_trained_again(genloop_config, make_docs_dataset,
                                                              make_tiny_model, register_model, tmp_path):
    from services.retrain import retrain

    config = genloop_config
    config.scheduler.dataset = "docs"
    make_docs_dataset(config)
    refused = register_model(config, make_tiny_model(tmp_path / "m"), tags={"dataset": "docs:v1", "parent_version": ""})
    result = retrain(config, "cron")
    assert (result.outcome, result.version) == ("skipped", refused)
    assert result.detail == f"v{refused} was already trained on docs:v1 from scratch and is not the champion"
    assert [str(v.version) for v in Registry(config).versions()] == [refused]  # nothing new was trained


def test_cli_runs_a_job_once_and_shows_the_history(tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    env = {"GENLOOP_HOME": str(tmp_path / "home")}
    result = CliRunner().invoke(app, ["scheduler", "run", "retrain"], env=env)
    assert result.exit_code == 1 and "retrain: failed" in result.output  # no data yet: recorded, not a crash
    result = CliRunner().invoke(app, ["scheduler", "run", "train"], env=env)
    assert isinstance(result.exception, UserInputError) and "unknown job 'train'" in str(result.exception)
    result = CliRunner().invoke(app, ["scheduler", "status"], env=env)
    assert result.exit_code == 0 and "failed 1" in result.output and "retrain" in result.output
    [run] = JobHistory(GenloopConfig(home=tmp_path / "home").scheduler_db).recent()
    assert (run.job, run.reason, run.outcome) == ("retrain", "manual", "failed") and "nothing to train on" in run.detail
    bad = CliRunner().invoke(app, ["scheduler", "status"], env={**env, "GENLOOP_SCHEDULER__RETRAIN_CRON": "0 3 *"})
    assert isinstance(bad.exception, UserInputError) and "crontab needs 5 fields" in str(bad.exception)


def test_scheduler_start_stops_cleanly_on_sigterm(tmp_path):
    """As under systemd or Kubernetes: SIGTERM stops `genloop scheduler start` like Ctrl-C, exit 0."""
    env = {**os.environ, "GENLOOP_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "scheduler", "start"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "scheduler running" in line:
                break
        process.send_signal(signal.SIGTERM)
        output = "".join(lines) + process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "retrain" in output and "stopping" in output and "Traceback" not in output
    with GenloopScheduler(GenloopConfig(home=tmp_path / "home")).exclusive():  # its lock was released
        pass
