"""Production state on PostgreSQL, by configuration alone: MLflow's tracking and registry backend,
the promotion audit log and its alias lock, the scheduler's job store and history, and the locks
that allow one ``genloop up`` and one scheduler per state on any number of hosts.

Everything is real: the machine's PostgreSQL on 127.0.0.1:5432 (a fresh pair of databases per
module, dropped afterwards), genloop's CLI in separate processes. Where no PostgreSQL answers the
module is skipped, saying so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from genloop.services.audit import AuditLog
from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.services.scheduler import GenloopScheduler, JobHistory
from genloop.services.state_lock import StateLock
from genloop.training.errors import UserInputError

pytestmark = pytest.mark.slow

SERVER = os.environ.get("GENLOOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")


@pytest.fixture(scope="module")
def databases() -> Iterator[tuple[str, str]]:
    """(MLflow's database URL, genloop's state database URL), both new and empty."""
    admin = create_engine(f"{SERVER}/postgres", poolclass=NullPool, isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 3})
    try:
        admin.connect().close()
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the server is not there
        pytest.skip(f"no PostgreSQL at {SERVER} ({type(exc).__name__}); set GENLOOP_TEST_POSTGRES")
    names = [f"genloop_test_{role}_{uuid.uuid4().hex[:8]}" for role in ("mlflow", "state")]
    with admin.connect() as connection:
        for name in names:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"{SERVER}/{names[0]}", f"{SERVER}/{names[1]}"
    with admin.connect() as connection:
        for name in names:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def config(tmp_path, databases) -> GenloopConfig:
    mlflow_url, state_url = databases
    return GenloopConfig(home=tmp_path / "home", tracking={"tracking_uri": mlflow_url},
                         state_db_url=state_url, scheduler={"job_store_url": state_url})


def env_of(config: GenloopConfig) -> dict[str, str]:
    """The same configuration for a genloop process, through the environment as an operator sets it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GENLOOP_")}
    assert config.tracking.tracking_uri and config.state_db_url and config.scheduler.job_store_url
    return {**env, "GENLOOP_HOME": str(config.home), "GENLOOP_TRACKING__TRACKING_URI": config.tracking.tracking_uri,
            "GENLOOP_STATE_DB_URL": config.state_db_url,
            "GENLOOP_SCHEDULER__JOB_STORE_URL": config.scheduler.job_store_url}


def waiting_on_locks(url: str) -> int:
    """Sessions of the database at ``url`` blocked on a lock right now."""
    with create_engine(url, poolclass=NullPool).connect() as connection:
        return connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                       "AND wait_event_type = 'Lock'")).scalar_one()


def test_promotions_from_two_processes_one_wins_and_the_audit_matches(config, make_tiny_model, register_model):
    versions = [register_model(config, make_tiny_model(seed)) for seed in (0, 1, 2)]
    registry = Registry(config)
    assert registry.client.get_experiment_by_name(config.tracking.experiment).artifact_location == \
        config.mlflow_artifacts_dir.as_uri()  # not ./mlruns in whatever directory the process started in
    registry.client.set_registered_model_alias(registry.name, "champion", versions[0])
    audit = AuditLog(config.state_db)

    # Both read the champion (v1), then queue on the alias lock this test holds; released, they race.
    with audit.exclusive():
        contenders = {version: subprocess.Popen(
            [sys.executable, "-m", "genloop.services.cli", "promote", version, "--force", "--reason", "race"],
            env=env_of(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for version in versions[1:]}
        deadline = time.monotonic() + 120
        while waiting_on_locks(config.state_db) < 2:
            assert time.monotonic() < deadline, "both promotions should wait on the alias lock"
            assert all(process.poll() is None for process in contenders.values()), \
                {v: p.communicate() for v, p in contenders.items()}
            time.sleep(0.2)
    finished = {version: (process.wait(timeout=120), process.communicate()[1])
                for version, process in contenders.items()}

    winner = next(version for version, (code, _) in finished.items() if code == 0)
    loser = next(version for version in versions[1:] if version != winner)
    assert finished[loser][0] == 1 and "champion changed" in finished[loser][1], finished
    assert (registry.alias_version("champion").version, registry.alias_version("previous").version) == \
        (int(winner), int(versions[0]))
    last_two = [(e.action, e.from_version, e.to_version, e.outcome) for e in audit.history()[-2:]]
    assert sorted(last_two) == sorted([("force-promote", versions[0], winner, "promoted"),
                                       ("force-promote", winner, loser, "conflict")])  # refused: judged against v1


def _hold_in_another_process(config: GenloopConfig, what: str) -> subprocess.Popen:
    """A process, as if on another host, that takes ``what`` ("up" or "scheduler") on ``config``'s state,
    says so, and sleeps."""
    take = {"up": f"held = StateLock({config.state_db!r}, 'up', Path('/nonexistent/up.lock'))",
            "scheduler": "held = GenloopScheduler(GenloopConfig()); held._take_store_lock()"}[what]
    code = "\n".join([
        "import time", "from pathlib import Path", "from genloop.services.config import GenloopConfig",
        "from genloop.services.scheduler import GenloopScheduler", "from genloop.services.state_lock import StateLock",
        take, "print('held', flush=True)", "time.sleep(600)"])
    # Another host: its own disk (GENLOOP_HOME), the same databases. A lock file could not see it.
    env = {**env_of(config), "GENLOOP_HOME": str(config.home.parent / "another-host")}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    return process


def test_one_up_and_one_scheduler_per_state_on_any_host(config):
    # `genloop up` against a state another process serves is refused before it starts anything.
    holder = _hold_in_another_process(config, "up")
    try:
        second = subprocess.run([sys.executable, "-m", "genloop.services.cli", "up"], env=env_of(config),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"genloop up already runs on this state (genloop up, pid {holder.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder that dies without a word frees the lock
        holder.wait()
    StateLock(config.state_db, "up", config.home / "unused.lock").close()  # the lock file is not what held

    holder = _hold_in_another_process(config, "scheduler")
    try:
        with pytest.raises(UserInputError, match=rf"another genloop scheduler runs on this job store \(genloop "
                                            rf"scheduler, pid {holder.pid} on"):
            GenloopScheduler(config).start()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    # The job store and the job history on PostgreSQL: the schedule survives a restart.
    config.scheduler.retrain_cron = "0 3 * * *"
    config.scheduler.drift_interval = config.scheduler.incoming_interval = None
    scheduler = GenloopScheduler(config)
    scheduler.start()
    try:
        run = scheduler.history.queued("retrain", "manual")
        assert scheduler.history.active("retrain") is not None
    finally:
        scheduler.stop()
    with GenloopScheduler(config).exclusive():  # the next holder closes what a stopped one left open
        pass
    closed = JobHistory(config.scheduler_db).get(run)
    assert closed is not None and closed[0].outcome == "failed"
    assert {job.job for job in JobHistory(config.scheduler_db).summary() if job.next_run} == {"retrain"}
