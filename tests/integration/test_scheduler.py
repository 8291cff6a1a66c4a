"""The scheduler on a real APScheduler with its SQLite job store, real Ray Train and the real gate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from genloop.monitoring.metrics import ControlPlaneCollector
from genloop.services.config import GenloopConfig
from genloop.services.exporter import read_state
from genloop.services.registry import Registry
from genloop.services.retrain import ingest_new_data
from genloop.services.schedule import window_wait
from genloop.services.scheduler import ACTIVE, DEFERRED, GenloopScheduler, JobHistory
from genloop.serving.inference_log import InferenceLog, InferenceRecord
from genloop.training.cleaning import TRAIN, VALIDATION
from genloop.training.dataset_store import list_versions, resolve_dataset, write_version
from genloop.training.errors import UserInputError


def next_runs(config) -> dict[str, float | None]:
    return {job.job: job.next_run for job in JobHistory(config.scheduler_db).summary()}


def wait_for_runs(history: JobHistory, count: int, timeout: float = 600) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [run for run in history.recent(50) if run.outcome not in ACTIVE]
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
        with pytest.raises(UserInputError, match="another genloop scheduler"), GenloopScheduler(config).exclusive():
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
    config.train.num_workers = 1  # the scheduler is the subject; data-parallel training is test_training's
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
    assert (second.outcome, second.detail) == (
        "skipped", "0 new documents in live:v1 since champion v1's data, fewer than 100")
    assert second.started_at >= first.finished_at  # one run at a time
    assert (drift.job, drift.outcome) == ("drift", "drift"), drift.detail
    assert (after_drift.job, after_drift.reason, after_drift.outcome) == ("retrain", "drift", "skipped")
    assert Registry(config).alias_version("champion").version == champion.version


def test_a_round_the_gate_already_refused_is_not_trained_again(genloop_config, make_docs_dataset,
                                                              make_tiny_model, register_model, tmp_path):
    from genloop.services.retrain import retrain

    config = genloop_config
    config.scheduler.dataset = "docs"
    make_docs_dataset(config)
    refused = register_model(config, make_tiny_model(), tags={"dataset": "docs:v1", "parent_version": ""})
    result = retrain(config, "cron")
    assert (result.outcome, result.version) == ("skipped", refused)
    assert result.detail == f"v{refused} was already trained on docs:v1 from scratch and is not the champion"
    assert [str(v.version) for v in Registry(config).versions()] == [refused]  # nothing new was trained


def test_cli_runs_a_job_once_and_shows_the_history(tmp_path):
    from typer.testing import CliRunner

    from genloop.services.cli import app

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
    process = subprocess.Popen([sys.executable, "-m", "genloop.services.cli", "scheduler", "start"], env=env,
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


def champion_on_docs(config, make_docs_dataset, make_tiny_model, register_model, tmp_path) -> tuple[str, list[str]]:
    """A champion (the tiny 64-token model) tagged as trained on docs:v1; and docs it never saw."""
    unseen_docs = make_docs_dataset(config)
    version = register_model(config, make_tiny_model(),
                             tags={"dataset": "docs:v1", "parent_version": ""})
    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", version)
    return version, [doc for doc in unseen_docs if len(doc) >= 100]


def land(path, docs: list[str], settled: bool = True):
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    if settled:
        os.utime(path, (time.time() - 120, time.time() - 120))
    return path


def test_files_landing_in_incoming_become_versions_and_enough_of_them_a_retrain(
        genloop_config, ray_cluster, make_docs_dataset, make_tiny_model, register_model, tmp_path):
    config = genloop_config
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    config.scheduler.incoming, config.scheduler.incoming_settle_s = incoming, 30
    config.scheduler.min_new_documents = 25
    config.scheduler.retrain_budget = 4  # steps: the champion was registered, not trained by genloop
    config.train.block_size, config.train.micro_batch_size, config.train.eval_batches = 32, 4, 2
    config.train.num_workers = 1  # the scheduler is the subject; data-parallel training is test_training's
    config.evaluation.max_texts, config.evaluation.prompts, config.evaluation.max_new_tokens = 10, 2, 4
    _, docs = champion_on_docs(config, make_docs_dataset, make_tiny_model, register_model, tmp_path)
    first = land(incoming / "a.jsonl", docs[:20])
    land(incoming / "copy-of-a.jsonl", docs[:20])  # the same bytes under another name
    second = land(incoming / "b.jsonl", docs[20:45], settled=False)  # still being written

    scheduler = GenloopScheduler(config)
    with scheduler.exclusive():
        assert scheduler.run("ingest", "schedule") == "ingested"  # fewer than 25 new documents: no retrain
        assert scheduler.run("ingest", "schedule") == "no new data"
        os.utime(second, (time.time() - 120, time.time() - 120))
        assert scheduler.run("ingest", "schedule") == "ingested"

    live = {v.version: v for v in list_versions(config.datasets_dir, "live")}
    assert [f["path"] for f in live[1].manifest["files"]] == [first.name]
    assert [f["path"] for f in live[2].manifest["files"]] == [first.name, second.name]
    assert live[2].manifest["extends"] == "live:v1" and live[2].manifest["counts"]["kept"] > live[1].manifest[
        "counts"]["kept"]
    runs = [(run.job, run.reason, run.outcome) for run in reversed(scheduler.history.recent(10))]
    assert runs == [("ingest", "schedule", "ingested"), ("ingest", "schedule", "no new data"),
                    ("ingest", "schedule", "ingested"), ("retrain", "new data", runs[3][2])]
    assert runs[3][2] in ("promoted", "rejected"), scheduler.history.recent(1)[0].detail  # it trained and was judged
    mix = resolve_dataset(config.datasets_dir, "live-mix:v1").manifest
    assert mix["base"] == "live:v2" and mix["replay"]["versions"] == ["docs:v1"] and mix["counts"]["new"] >= 25

    # The warm start asked the gate's question at every evaluation: both curves and the score are in its run.
    registry = Registry(config)
    run_id = registry.versions()[-1].run_id
    curves = {key: {m.step: m.value for m in registry.client.get_metric_history(run_id, key)}
              for key in ("val_loss", "val_loss_reference", "gate_score")}
    assert set(curves["val_loss"]) == set(curves["val_loss_reference"]) == set(curves["gate_score"]) == {0, 1, 2, 3, 4}
    run = registry.client.get_run(run_id)
    best = run.data.metrics["best_step"]
    assert run.data.metrics["best_gate_score"] == max(v for step, v in curves["gate_score"].items() if step > 0)
    assert curves["gate_score"][best] == run.data.metrics["best_gate_score"]
    assert run.data.tags["selection"].startswith(f"step {int(best)}: ")


def test_a_retrain_outside_the_window_waits_for_it_unless_urgent(genloop_config):
    config = genloop_config
    config.scheduler.retrain_cron, config.scheduler.drift_interval = None, None
    now = datetime.now(UTC)
    config.scheduler.window = f"{now + timedelta(hours=2):%H:%M}-{now + timedelta(hours=3):%H:%M}"
    opens = window_wait(config.scheduler.window, now)
    scheduler = GenloopScheduler(config)
    scheduler.start()
    try:
        assert scheduler.run("retrain", "drift") == "deferred"
        assert scheduler.scheduler.get_job(DEFERRED).next_run_time == opens
        assert scheduler.run("retrain", "drift", urgent=True) == "failed"  # it ran: there is no data yet
        assert scheduler.run("retrain", "manual") == "failed"  # a person asking never waits
    finally:
        scheduler.stop()
    restarted = GenloopScheduler(config)
    restarted.start()
    try:
        assert restarted.scheduler.get_job(DEFERRED).next_run_time == opens  # the wait survives a restart
    finally:
        restarted.stop()
    deferred, urgent, manual = reversed(JobHistory(config.scheduler_db).recent(3))
    assert (deferred.outcome, deferred.reason) == ("deferred", "drift") and opens.isoformat() in deferred.detail
    assert (urgent.outcome, manual.outcome) == ("failed", "failed") and "nothing to train on" in urgent.detail


def test_a_failing_stage_is_retried_then_the_champion_keeps_serving(
        genloop_config, make_docs_dataset, make_tiny_model, register_model, tmp_path):
    config = genloop_config
    config.scheduler.max_attempts, config.scheduler.retry_backoff_s = 3, 0.05
    champion, docs = champion_on_docs(config, make_docs_dataset, make_tiny_model, register_model, tmp_path)
    table = pa.table({"text": docs[:40]})
    folder = write_version(Path(config.datasets_dir) / "live", 1, [(table, table)], {"content_hash": "live1"})
    (Path(folder) / "train.parquet").write_bytes(b"PAR1 a disk that lost most of this file")  # the data stage fails

    scheduler = GenloopScheduler(config)
    with scheduler.exclusive():
        assert scheduler.run("retrain", "schedule") == "failed"
    attempts = list(reversed(scheduler.history.recent(3)))
    assert [(run.reason, run.outcome) for run in attempts] == [
        ("schedule", "failed"), ("schedule (attempt 2/3)", "failed"), ("schedule (attempt 3/3)", "failed")]
    assert all("ArrowInvalid" in run.detail for run in attempts), attempts[0].detail
    assert attempts[1].started_at - attempts[0].finished_at >= 0.05  # with backoff
    assert str(Registry(config).alias_version("champion").version) == champion


def test_well_rated_answers_join_the_retrains_data_once(genloop_config, ray_cluster, make_docs_dataset):
    """scheduler.feedback_min_rating: answers rated at least that become documents of the retrain's dataset;
    worse-rated ones and answers kept only as hashes do not; the same ratings again make no new version."""
    config = genloop_config
    make_docs_dataset(config)
    config.scheduler.dataset, config.scheduler.feedback_min_rating = "docs", 1
    liked = "The with statement wraps a block in the methods of a context manager, so cleanup always runs."
    disliked = "A lambda expression yields an anonymous function object whose body is one single expression."
    for mode, answers in (("full", {"cmpl-" + "a" * 24: liked, "cmpl-" + "b" * 24: disliked}),
                          ("hashed", {"cmpl-" + "c" * 24: "Secret prompt stored only as a hash, never as text."})):
        log = InferenceLog(config.inference_log_dir, text=mode)
        for response_id, text in answers.items():
            log.append(InferenceRecord(request_id=response_id, route="completions", model_version="1", status=200,
                                       prompt=text[:40], output=text[40:]))
        log.close()
    log = InferenceLog(config.inference_log_dir)
    for response_id, rating in (("cmpl-" + "a" * 24, 1), ("cmpl-" + "b" * 24, 1), ("cmpl-" + "b" * 24, -1),
                                ("cmpl-" + "c" * 24, 1)):
        log.append(InferenceRecord(request_id=response_id, route="feedback", model_version="", status=200, prompt="",
                                   rating=rating))
    log.close()

    ingest_new_data(config, sources=False)
    versions = list_versions(config.datasets_dir, "docs")
    assert [v.version for v in versions] == [1, 2] and versions[1].manifest["extends"] == "docs:v1"
    added = set(versions[1].texts(TRAIN) + versions[1].texts(VALIDATION)) - set(
        versions[0].texts(TRAIN) + versions[0].texts(VALIDATION))
    assert added == {liked}  # the latest rating of the second answer is -1; the third has no text to learn
    ingest_new_data(config, sources=False)
    assert len(list_versions(config.datasets_dir, "docs")) == 2
