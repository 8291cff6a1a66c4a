"""Connecting to Ray: an embedded local instance by default, an existing cluster when configured."""

from __future__ import annotations

import logging
import os
import socket

import ray
import ray.data

from genloop.services import console
from genloop.services.config import RayConfig
from genloop.services.leftovers import reap_orphaned_ray_agents, watch_local_ray
from genloop.serving.proxy_errors import PROXY_ENV

logger = logging.getLogger(__name__)


# Ray Serve's faster data plane: most of its "throughput optimized" mode (Ray >= 2.56) without direct
# ingress, which would drop the proxy that routes between old and new replicas during a rollout.
# The proxy hands each request to the replica over gRPC, by value, instead of through Ray's object
# store; user code and the router share their process's event loop instead of one thread each; the
# request-path log is buffered; objects alive at start-up are left out of garbage collection.
# Measured with benchmarks/serve_load.py at 32 streams on 2 CPU cores: 0.83x of one in-process
# generate against 0.76x with Serve's defaults (mean of 6 interleaved runs).
SERVE_DATA_PLANE_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}

# Serve's controller gives a new HTTP proxy 5 s, counted from the actor's creation, to answer its
# first readiness check, or kills it; `serve.start` then fails with the proxy's ActorDiedError. The
# 5 s include starting the proxy's worker process, which a busy node (two test workers training
# on two cores, in CI) took longer than. 60 s is `serve.start`'s own wait for the proxy.
SERVE_START_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def use_serve_env() -> None:
    """Put ``SERVE_DATA_PLANE_ENV``, ``SERVE_START_ENV`` and the proxy's OpenAI-shaped errors
    (``serving.proxy_errors``) in this process's environment, where a Ray it starts passes them to
    Serve's controller, proxy and replicas; values already set (an operator's) win. A cluster started
    elsewhere (``ray start``) takes them from its own environment."""
    for name, value in {**SERVE_DATA_PLANE_ENV, **SERVE_START_ENV, **PROXY_ENV}.items():
        os.environ.setdefault(name, value)


STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
_pinned: dict[str, str] = {}  # the address own_state_api set last, to tell it from an operator's


def own_state_api() -> int:
    """A free port for the dashboard of the Ray this process starts, with Ray's state API
    (``RAY_API_SERVER_ADDRESS``) pointed at it in this process's environment, which that Ray's
    processes inherit; an address already set (an operator's) wins.

    Left to itself, the state API finds "the" cluster through ``/tmp/ray/ray_current_cluster``, which
    ``ray start`` writes and a stopped ``--block`` or killed head leaves behind. Pointed at a dead GCS,
    each call waits 40 s. Ray Train's placement-group cleaner asks it whether a run's controller
    lives, and every training run's end waited 12 s for the cleaner to stop: a trivial
    ``TorchTrainer.fit`` took 22 s here, 8-10 s with the state API pointed at its own cluster.
    Pointed at another live cluster, the cleaner would find no such controller and remove the run's
    placement group. Without a dashboard nothing answers at the port, and the cleaner's calls fail at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if os.environ.get(STATE_API_ENV) in (None, _pinned.get("address")):  # unset, or ours for an earlier Ray
        _pinned["address"] = os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"
    return port


def connect(settings: RayConfig) -> None:
    """Start or join Ray once per process; a no-op when already connected."""
    # Per-operator bars from every worker, and each execution's plan, drown the one progress bar
    # that matters (ours).
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    if ray.is_initialized():
        return
    # Under the CLI, the libraries' and Ray's output goes to the run's log file (services.console).
    quiet = console.log_path() is not None
    console.take_back_library_loggers()
    if settings.address:
        logger.info("joining Ray cluster at %s", settings.address)
        ray.init(address=settings.address, logging_level=logging.WARNING, configure_logging=not quiet)
    else:
        # "local" always starts a fresh instance: without it, ray.init() joins whatever cluster a past
        # `ray start` on this machine recorded in /tmp/ray — even one that has since died.
        use_serve_env()
        reap_orphaned_ray_agents()  # what an earlier local Ray, killed with its genloop, left running
        ray.init(address="local", num_cpus=settings.num_cpus, logging_level=logging.WARNING,
                 configure_logging=not quiet, dashboard_port=own_state_api())
        watch_local_ray()
    if quiet:
        console.take_back_library_loggers()
        console.route_ray_output()
        console.announce()
