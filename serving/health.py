"""``GET /health``, answered by a Serve deployment of its own, so that it never queues behind inference.

Serve routes a request to a replica only while that replica holds fewer than
``max_ongoing_requests``; every other request waits in the router's queue. A health route inside
the model's replicas therefore waits behind whatever holds their slots (a load peak, or clients that
send their bodies a byte at a time), and a load balancer's probe times out exactly when the service
is busiest. This deployment holds no model and does no inference: it answers from the Serve
controller's view of the model's deployment (at least one replica running, which Serve counts only
once the replica's own ``check_health``, i.e. the engine's, has passed), refreshed in the background
about once a second, so a probe costs a dictionary lookup whatever the probing rate.

Its route is the model application's prefix plus ``/health``; Serve's proxy sends a request to the
application with the longest matching prefix. It is public: probes carry no API key.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from genloop.serving.protocol import VERSION_HEADER

logger = logging.getLogger(__name__)

REFRESH_S = 1.0


def health_route(route_prefix: str) -> str:
    """Where the health application of a model application served at ``route_prefix`` answers."""
    return f"{route_prefix.rstrip('/')}/health"


@serve.deployment(name="health", max_ongoing_requests=1000, max_queued_requests=1000, health_check_period_s=2,
                  ray_actor_options={"num_cpus": 0})
class HealthCheck:
    """Says whether the application ``app_name`` serves; the version it serves comes as ``user_config``
    (``{"model_version": …, "waiting": …}``), which Serve hands to ``reconfigure`` without restarting
    the replica. ``waiting`` is what the status says while nothing serves (``bootstrapping`` while
    ``genloop up`` trains the first model), "unavailable" without it."""

    def __init__(self, app_name: str, deployment_name: str):
        self.app_name, self.deployment_name = app_name, deployment_name
        self.model_version, self.waiting = "", None
        self.serving, self.detail = False, "starting"
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    def reconfigure(self, user_config: dict) -> None:
        self.model_version = str(user_config.get("model_version", ""))
        self.waiting = user_config.get("waiting")

    async def _refresh(self) -> None:
        while True:
            try:
                status = await asyncio.to_thread(serve.status)  # a controller call: off the event loop
                app = status.applications.get(self.app_name)
                deployment = app.deployments.get(self.deployment_name) if app is not None else None
                running = deployment.replica_states.get("RUNNING", 0) if deployment is not None else 0
                self.serving = running > 0
                self.detail = f"{running} replicas running" if deployment is not None else "not deployed"
            except Exception as exc:  # noqa: BLE001 — the controller restarting: say so, try again
                self.serving, self.detail = False, f"serve status unavailable: {type(exc).__name__}"
                logger.warning("health: %s", self.detail)
            await asyncio.sleep(REFRESH_S)

    async def __call__(self, request: Request) -> JSONResponse:
        body = {"status": "ok" if self.serving else self.waiting or "unavailable",
                "model_version": self.model_version, "detail": self.detail}
        return JSONResponse(body, status_code=200 if self.serving else 503,
                            headers={VERSION_HEADER: self.model_version})


def health_app(app_name: str, model_version: str, deployment_name: str = "genloop", waiting: str | None = None):
    """The health application of ``app_name``, ready for ``serve.run``."""
    # serve.deployment made the class a Deployment; mypy keeps a class decorator's input type.
    options = {"user_config": {"model_version": model_version, "waiting": waiting}}
    return HealthCheck.options(**options).bind(app_name, deployment_name)  # type: ignore[attr-defined]
