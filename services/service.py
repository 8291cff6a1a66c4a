"""``genloop up``: the whole loop as one service, one process tree.

It runs what an operator used to string together by hand: the Serve application (the champion,
the alias watch, rolling updates), the scheduler with all its jobs, the control plane's metrics and
the admin API (``services.admin``). With no champion yet it bootstraps one, as the scheduler's
first retrain (ingest → train from scratch → gate → promote), while ``/health`` says
"bootstrapping"; the watcher deploys the model once the gate promotes it.

Stopping (Ctrl-C, SIGTERM) goes in the order that loses nothing: mutating admin calls are
refused and the scheduler fires no new job; the Serve app drains its in-flight requests while a
running job goes on; the job then gets ``service.shutdown_grace_s`` to finish,
after which it is recorded as interrupted (and its MLflow run as KILLED) and left to die with the
process, which exits at once; the admin API and the exporter stop. Only one ``genloop up`` may run on
a state (``services.state_lock``: an advisory lock in the state database where that is PostgreSQL,
on any host; a lock file in the state folder otherwise): a second one is refused before anything starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from rich.console import Console

from genloop.monitoring.scrape_targets import ScrapeTarget
from genloop.services.admin import admin_tokens, build_admin_api, is_loopback
from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.exporter import start_exporter
from genloop.services.retrain import BOOTSTRAP
from genloop.services.scheduler import ACTIVE, GenloopScheduler
from genloop.services.serving_control import ChampionWatcher, current_target, start_serving, stop_serving
from genloop.services.state_lock import LockHeld, StateLock
from genloop.training.errors import UserInputError

logger = logging.getLogger(__name__)

LOCK_FILE = "up.lock"


@dataclass
class _Parts:
    """What has been started, so that ``stop`` stops exactly that, in reverse."""

    lock: StateLock | None = None
    scheduler: GenloopScheduler | None = None
    watcher: ChampionWatcher | None = None
    exporter: ScrapeTarget | None = None
    admin: uvicorn.Server | None = None
    admin_thread: threading.Thread | None = None


class GenloopService:
    """``start`` brings everything up and returns; ``wait`` blocks until interrupted; ``stop`` drains."""

    def __init__(self, config: GenloopConfig, console: Console):
        self.config, self.console = config, console
        self.stopping = threading.Event()
        self.parts = _Parts()
        self.bootstrap_run: int | None = None
        self.admin_url = ""
        self._stages_told: dict[int, int] = {}

    # --- start ---------------------------------------------------------------------------------
    def start(self, after_ray: Callable[[], None] = lambda: None) -> None:
        """Start everything; ``after_ray`` runs once Ray is up (``ray.init`` replaces the SIGTERM
        handler, and the caller puts its own back)."""
        settings = self.config.service
        tokens = admin_tokens()
        if not tokens and not is_loopback(settings.admin_host):
            raise UserInputError(f"service.admin_host {settings.admin_host} is not a loopback address: set "
                                 "GENLOOP_ADMIN_TOKEN, or the admin API would let anyone on the network steer genloop")
        self._lock()
        connect(self.config.ray)  # here, before the scheduler's thread could start a Ray of its own
        after_ray()
        scheduler = self.parts.scheduler = GenloopScheduler(self.config, show_progress=True)
        scheduler.start()  # takes the job store's lock: refused while `genloop scheduler start` runs
        bootstrapping = current_target(self.config) is None
        if bootstrapping:
            self.bootstrap_run = scheduler.run_now("retrain", BOOTSTRAP)
        self._start_admin(scheduler, tokens)
        access = f"bearer tokens: {', '.join(sorted(set(tokens.values())))}" if tokens else "no token: loopback only"
        self.console.print(f"admin API at {self.admin_url} ({access})")
        if bootstrapping:
            self.console.print(f"no champion yet: bootstrapping one (job run {self.bootstrap_run}: ingest → train → "
                               "gate → promote); /health says \"bootstrapping\" until it serves")
        self.parts.watcher = start_serving(self.config, bootstrapping=True)
        self.parts.exporter = start_exporter(self.config)
        base = f"http://{self.config.serving.host}:{self.config.serving.port}"
        if self.parts.watcher.serving is not None:
            self.console.print(f"serving v{self.parts.watcher.serving.champion} at {base}/v1 (Ctrl-C to stop)")
        else:
            self.console.print(f"will serve at {base}/v1 once the first model passes the gate (Ctrl-C to stop)")

    def _lock(self) -> None:
        try:
            self.parts.lock = StateLock(self.config.state_db, "up", self.config.home / LOCK_FILE)
        except LockHeld as held:
            raise UserInputError(f"genloop up already runs on this state ({held}); stop it first, or give this "
                                 "one another GENLOOP_HOME and state_db_url") from None

    def _start_admin(self, scheduler: GenloopScheduler, tokens: dict[str, str]) -> None:
        settings = self.config.service
        api = build_admin_api(self.config, scheduler, self._aliases_moved, self.stopping, tokens)
        # log_config=None: uvicorn's records go to the root logger, i.e. the run's log file.
        server = uvicorn.Server(uvicorn.Config(api, host=settings.admin_host, port=settings.admin_port,
                                               log_config=None, access_log=False, lifespan="off"))
        thread = threading.Thread(target=server.run, name="admin-api", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UserInputError(f"the admin API could not listen on {settings.admin_host}:{settings.admin_port} "
                                     "(port in use?); set service.admin_port")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.admin_url = f"http://{settings.admin_host}:{port}/admin"
        self.parts.admin, self.parts.admin_thread = server, thread

    def _aliases_moved(self) -> None:
        if self.parts.watcher is not None:
            self.parts.watcher.poke()

    # --- run -----------------------------------------------------------------------------------
    def wait(self) -> None:
        """Until interrupted: say what running jobs do and when the bootstrapped model serves."""
        watcher = self.parts.watcher
        assert watcher is not None, "wait() follows start()"
        announced = watcher.serving is not None
        while True:
            time.sleep(0.5)
            self._report_stages()
            if not announced and watcher.serving is not None:
                announced = True
                self.console.print(f"serving v{watcher.serving.champion} at http://"
                                   f"{self.config.serving.host}:{self.config.serving.port}/v1")

    def _report_stages(self) -> None:
        """One console line per stage a job reaches, and one when it ends (training draws its progress
        bar in between)."""
        scheduler = self.parts.scheduler
        assert scheduler is not None, "stages are reported after start()"
        current = scheduler.running_job()
        for run_id in {*self._stages_told, *([current["run_id"]] if current else [])}:
            found = scheduler.history.get(run_id)
            if found is None:
                continue
            run, stages = found
            for stage in stages[self._stages_told.get(run_id, 0):]:
                self.console.print(f"job run {run_id} ({run.job}, {run.reason}): {stage.stage}"
                                   + (f" — {stage.detail}" if stage.detail else ""), highlight=False)
            self._stages_told[run_id] = len(stages)
            if run.outcome not in ACTIVE:
                self.console.print(f"job run {run_id} ({run.job}, {run.reason}) {run.outcome}: {run.detail}",
                                   highlight=False)
                del self._stages_told[run_id]

    # --- stop ----------------------------------------------------------------------------------
    def stop(self) -> dict | None:
        """Drain and stop whatever was started. A job still running after the grace period is left to
        die with the process: returned (run_id, job, stage), and the caller must exit at once, before
        that job's thread touches a Ray that is going away (Ray's core worker exits the process then)."""
        self.stopping.set()
        parts = self.parts
        if parts.scheduler is not None:
            parts.scheduler.pause()  # no new job while Serve drains; a running one goes on meanwhile
        if parts.watcher is not None:
            parts.watcher.stop()
            self.console.print("draining in-flight requests…")
            stop_serving(own_cluster=self.config.ray.address is None)
        left = None
        if parts.scheduler is not None:
            grace = self.config.service.shutdown_grace_s
            if parts.scheduler.running_job() is not None:
                self.console.print(f"waiting up to {grace:g} s for the running job to finish…")
            left = parts.scheduler.stop(grace_s=grace)
            if left:
                self.console.print(f"job run {left['run_id']} ({left['job']}) interrupted during its "
                                   f"{left.get('stage', 'start')} stage; recorded as failed")
        if parts.exporter is not None:
            parts.exporter.close()
        if parts.admin is not None and parts.admin_thread is not None:
            parts.admin.should_exit = True
            parts.admin_thread.join(timeout=10)
        if parts.lock is not None:
            parts.lock.close()
        return left
