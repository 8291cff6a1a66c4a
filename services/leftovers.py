"""What a genloop process killed outright (SIGKILL, out of memory, a lost machine) leaves behind, and
how it is cleared.

A killed process runs no ``finally``: its MLflow training run stays RUNNING for ever, its work folder
stays on disk, and the local Ray it started loses its GCS and raylet (Ray ties those to the driver's
life) but not the raylet's agents, which outlive it as orphans and ignore SIGTERM. A watchdog
process started beside a local Ray kills those agents as soon as the driver is gone; the next
genloop command that would create the same kind of thing clears what it can prove is dead: a run or
a folder whose recorded process, on this host, no longer exists; a Ray agent whose raylet is gone
(if the watchdog was killed too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

HOST_TAG, PID_TAG = "genloop.host", "genloop.pid"
WORK_PREFIX = "train-"
_WORK_DIR = re.compile(rf"{WORK_PREFIX}(\d+)-")
# The raylet's children that do not die with it (the workers do: they watch the raylet's socket).
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def owner_tags() -> dict[str, str]:
    """Tags naming the process that owns a run, so a later start can tell whether it is still alive."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _dead(pid: int) -> bool:
    return not psutil.pid_exists(pid)


def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment_id`` whose owner ran on this host and is gone."""
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit() and _dead(int(tags[PID_TAG])):
            client.set_tag(run.info.run_id, "genloop.failure", "its process stopped without closing it")
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    if closed:
        logger.warning("closed %d training runs as FAILED: their process was killed (%s)", len(closed),
                       ", ".join(run_id[:8] for run_id in closed))
    return closed


def work_dir_prefix() -> str:
    """The prefix of this process's work folders: ``sweep_work_dirs`` reads the owner from it."""
    return f"{WORK_PREFIX}{os.getpid()}-"


def sweep_work_dirs(home: Path) -> list[Path]:
    """Remove the work folders under ``home`` whose owning process is gone."""
    swept = []
    for folder in Path(home).glob(f"{WORK_PREFIX}*"):
        match = _WORK_DIR.match(folder.name)
        if folder.is_dir() and match and _dead(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    if swept:
        logger.warning("removed %d work folders of killed processes", len(swept))
    return swept


def reap_orphaned_ray_agents() -> list[int]:
    """SIGKILL this user's Ray agents whose raylet died (they are re-parented to init, or to the
    nearest subreaper, and serve nothing). An agent of a live raylet, its child, is never touched."""
    reaped = []
    me = os.getuid()
    for process in psutil.process_iter(["pid", "ppid", "uids", "name", "cmdline"]):
        try:
            info = process.info
            title = " ".join(info["cmdline"] or [])
            if info["uids"].real != me or not title.startswith(RAY_AGENTS):
                continue
            parent = psutil.Process(info["ppid"]) if info["ppid"] else None
            if parent is None or "raylet" not in parent.name():
                process.kill()
                reaped.append(info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if reaped:
        logger.warning("stopped %d Ray agents left by a killed Ray", len(reaped))
    return reaped


_watchdogs: list[subprocess.Popen] = []  # held for the process's life: their pipes close when it dies


def watch_local_ray() -> None:
    """Make the local Ray this process just started die with it, even by SIGKILL: a small watchdog
    process reads a pipe from this one, and when the pipe closes (this process exited, however) it
    kills the raylet's agents that Ray itself would leave behind."""
    raylets = [child.pid for child in psutil.Process().children() if child.name() == "raylet"]
    if raylets:
        _watchdogs.append(subprocess.Popen([sys.executable, "-m", "genloop.services.leftovers", str(raylets[0])],
                                           stdin=subprocess.PIPE, start_new_session=True))


def _watch(raylet_pid: int) -> None:
    """The watchdog: note the raylet's agents while it lives, kill them once the driver's pipe closes."""
    agents: dict[int, psutil.Process] = {}
    while not select.select([sys.stdin], [], [], 0.5)[0]:
        try:
            for child in psutil.Process(raylet_pid).children():
                if " ".join(child.cmdline()).startswith(RAY_AGENTS):
                    agents.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    sys.stdin.read()  # the driver never writes: this returns at end of file
    for agent in agents.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            agent.kill()  # psutil checks it is still the process it noted, not a reused pid


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
