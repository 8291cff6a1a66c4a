"""Control plane of serving: deploy the registry's champion on Ray Serve and follow the alias.

Serving itself knows nothing of the registry: it serves a model folder and a version string.
This module resolves ``champion`` to those, deploys the Serve application, and redeploys it when
the alias moves. A redeploy with new arguments is a Serve rolling update: replicas of the new
version start and pass their health check before the old ones stop taking traffic and drain,
so a swap fails no request.
"""

from __future__ import annotations

import logging
import os
import threading

from ray import serve

from services.cluster import connect
from services.config import GenloopConfig, UserInputError
from services.registry import Registry
from serving.app import ServerSettings, build_app

logger = logging.getLogger(__name__)

APP_NAME = "genloop"
API_KEYS_ENV = "GENLOOP_API_KEYS"  # secrets come from the environment only


def settings_for(config: GenloopConfig, version: str) -> ServerSettings:
    registry = Registry(config)
    model_version = registry.resolve(version)
    serving = config.serving
    if serving.engine == "vllm":
        from serving.vllm_engine import VLLMEngine as engine_class

        options: dict = {}
    else:
        from serving.hf_engine import HFEngine as engine_class

        options = {"device": serving.device, "max_batch_size": serving.max_batch_size,
                   "max_wait_ms": serving.max_wait_ms, "max_queue_size": serving.max_queue_size,
                   "int8": serving.int8}
    keys = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    return ServerSettings(
        served_model_name=serving.model_name,
        model_path=str(registry.local_path(model_version)),
        model_version=str(model_version.version),
        engine_class=engine_class,
        engine_options=options,
        api_keys=keys,
        max_body_bytes=serving.max_body_bytes,
        inference_log_dir=str(config.inference_log_dir) if serving.inference_log else None,
        redact_prompts=serving.redact_prompts,
    )


def deploy(config: GenloopConfig, version: str) -> str:
    """Deploy (or roll to) ``version``; returns once its replicas are serving."""
    settings = settings_for(config, version)
    app = build_app(settings, num_replicas=config.serving.num_replicas,
                    max_ongoing_requests=config.serving.max_ongoing_requests,
                    max_queued_requests=config.serving.max_queued_requests)
    serve.run(app, name=APP_NAME, route_prefix="/")
    logger.info("serving v%s", settings.model_version)
    return settings.model_version


class ChampionWatcher:
    """Polls the ``champion`` alias and rolls the app to each new version it names."""

    def __init__(self, config: GenloopConfig, serving_version: str):
        self.config = config
        self.serving_version = serving_version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)

    def start(self) -> ChampionWatcher:
        self._thread.start()
        return self

    def check_once(self) -> bool:
        """Roll to the champion if it changed; True when a rollout happened."""
        champion = Registry(self.config).alias_version("champion")
        if champion is None or str(champion.version) == self.serving_version:
            return False
        logger.info("champion moved v%s → v%s: rolling out", self.serving_version, champion.version)
        self.serving_version = deploy(self.config, str(champion.version))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.config.serving.watch_interval_s):
            try:
                self.check_once()
            except Exception:  # a failed rollout keeps the old version serving; try again next tick
                logger.exception("rollout failed; still serving v%s", self.serving_version)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def start_serving(config: GenloopConfig) -> ChampionWatcher:
    """Start Serve over HTTP with the champion and a watcher that follows the alias."""
    champion = Registry(config).alias_version("champion")
    if champion is None:
        raise UserInputError("no champion to serve: promote a version first (genloop promote VERSION)")
    connect(config.ray)
    serve.start(http_options={"host": config.serving.host, "port": config.serving.port})
    version = deploy(config, str(champion.version))
    return ChampionWatcher(config, version).start()
