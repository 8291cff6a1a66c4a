"""What a killed genloop leaves behind is cleared at the next start: real MLflow on SQLite, real
processes, a real local Ray killed with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from genloop.services.config import GenloopConfig
from genloop.services.leftovers import (
    PID_TAG,
    RAY_AGENTS,
    close_orphaned_runs,
    owner_tags,
    reap_orphaned_ray_agents,
    sweep_work_dirs,
    work_dir_prefix,
)
from genloop.services.registry import Registry


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


def killed_driver(start_ray: str) -> tuple[psutil.Process, list[psutil.Process]]:
    """Start a driver that runs ``start_ray``, note its raylet and the raylet's agents, SIGKILL it,
    and wait for the raylet to die with it (Ray ties the raylet to its driver)."""
    driver = subprocess.Popen([sys.executable, "-c", f"import time\n{start_ray}\nprint('up', flush=True)\n"
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert driver.stdout.readline().strip() == "up"
        raylet = next(p for p in psutil.Process(driver.pid).children() if p.name() == "raylet")
        deadline = time.time() + 30
        while len(agents := [p for p in raylet.children() if " ".join(p.cmdline()).startswith(RAY_AGENTS)]) < 2 \
                and time.time() < deadline:
            time.sleep(0.5)
        assert len(agents) == 2
        time.sleep(2)  # the watchdog, where there is one, polls the raylet's children twice a second
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    psutil.wait_procs([raylet], timeout=30)
    assert not raylet.is_running()
    return raylet, agents


def test_a_killed_local_ray_leaves_agents_that_the_next_start_stops():
    """Ray ties its GCS and raylet to the driver that started them, not the raylet's agents: after a
    SIGKILL they stay, ignoring SIGTERM, until genloop's next local start reaps them."""
    _, agents = killed_driver("import ray; ray.init(address='local', num_cpus=1, include_dashboard=False)")
    time.sleep(2)
    assert all(agent.is_running() for agent in agents)  # the leak, without genloop's watchdog

    # Any local start reaps them, another test's included: those still running are this call's to reap.
    assert {agent.pid for agent in agents if agent.is_running()} <= set(reap_orphaned_ray_agents())
    psutil.wait_procs(agents, timeout=10)
    assert not any(agent.is_running() for agent in agents)


def test_a_local_ray_genloop_starts_dies_with_it():
    """genloop's local Ray comes with a watchdog: the same SIGKILL leaves no agent behind."""
    _, agents = killed_driver("from services.cluster import connect; from services.config import RayConfig; "
                              "connect(RayConfig(num_cpus=1))")
    gone, alive = psutil.wait_procs(agents, timeout=15)
    assert not alive
