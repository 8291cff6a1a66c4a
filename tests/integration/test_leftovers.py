"""What a killed genloop leaves behind is cleared at the next start: real MLflow on SQLite, real
processes, a real local Ray killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from services.config import GenloopConfig
from services.leftovers import (
    PID_TAG,
    RAY_AGENTS,
    close_orphaned_runs,
    owner_tags,
    reap_orphaned_ray_agents,
    sweep_work_dirs,
    work_dir_prefix,
)
from services.registry import Registry


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_runs_and_work_folders_of_a_killed_process_are_closed_and_removed(genloop_config: GenloopConfig):
    registry = Registry(genloop_config)
    client, experiment = registry.client, registry.experiment_id()
    gone = dead_pid()
    orphan = client.create_run(experiment, tags={**owner_tags(), PID_TAG: str(gone)}).info.run_id
    alive = client.create_run(experiment, tags=owner_tags()).info.run_id  # this process: still running
    elsewhere = client.create_run(experiment, tags={"genloop.host": "another-host", PID_TAG: str(gone)}).info.run_id
    home = genloop_config.home
    (home / f"train-{gone}-abc").mkdir(parents=True)
    (home / f"{work_dir_prefix()}def").mkdir()

    assert close_orphaned_runs(client, experiment) == [orphan]
    status = {run_id: client.get_run(run_id).info.status for run_id in (orphan, alive, elsewhere)}
    assert status == {orphan: "FAILED", alive: "RUNNING", elsewhere: "RUNNING"}
    assert client.get_run(orphan).data.tags["genloop.failure"] == "its process stopped without closing it"
    assert sweep_work_dirs(home) == [home / f"train-{gone}-abc"]
    assert [p.name for p in home.glob("train-*")] == [f"{work_dir_prefix()}def"]


def test_a_killed_local_ray_leaves_agents_that_the_next_start_stops(tmp_path: Path):
    """Ray ties its GCS and raylet to the driver that started them, not the raylet's agents: after a
    SIGKILL they stay, ignoring SIGTERM, until genloop's next local start reaps them."""
    driver = subprocess.Popen(
        [sys.executable, "-c", "import time; from services.cluster import connect; from services.config import "
         "RayConfig; connect(RayConfig(num_cpus=1)); print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2], env={**os.environ, "RAY_ADDRESS": ""})
    try:
        assert driver.stdout.readline().strip() == "up"
        raylet = next(p for p in psutil.Process(driver.pid).children() if p.name() == "raylet")
        agents = [p for p in raylet.children() if " ".join(p.cmdline()).startswith(RAY_AGENTS)]
        assert len(agents) == 2
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 30
    while raylet.is_running() and time.time() < deadline:
        time.sleep(0.5)
    assert not raylet.is_running() and all(agent.is_running() for agent in agents)  # the leak

    assert sorted(reap_orphaned_ray_agents()) == sorted(agent.pid for agent in agents)
    psutil.wait_procs(agents, timeout=10)
    assert not any(agent.is_running() for agent in agents)
