"""What a genloop process killed outright (SIGKILL, out of memory, a lost machine) leaves behind, and
the sweep at the next start that clears it.

A killed process runs no ``finally``: its MLflow training run stays RUNNING for ever, its work folder
stays on disk, and the local Ray it started loses its GCS and raylet (Ray ties those to the driver's
life) but not the raylet's agents, which outlive it as orphans and ignore SIGTERM. The next genloop
command that would create the same kind of thing clears what it can prove is dead: a run or a folder
whose recorded process, on this host, no longer exists; a Ray agent whose raylet is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
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
