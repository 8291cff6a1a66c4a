"""Control plane of serving: deploy the registry's champion on Ray Serve and follow the alias.

Serving itself knows nothing of the registry: it serves a model folder and a version string.
This module resolves ``champion`` to those, deploys the Serve application, and redeploys it when
the alias moves. A redeploy with new arguments is a Serve rolling update: replicas of the new
version start and pass their health check before the old ones stop taking traffic and drain,
so a swap fails no request. With ``serving.shadow_percent`` set and a ``challenger`` alias, the
challenger runs beside the champion in shadow mode and the watcher follows that alias too.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass

from ray import serve

from genloop.monitoring import metrics
from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.serving.app import announce_waiting, delete_app, serve_app
from genloop.serving.settings import ServerSettings
from genloop.training.errors import UserInputError
from genloop.training.models import check_weights

logger = logging.getLogger(__name__)

APP_NAME = "genloop"
API_KEYS_ENV = "GENLOOP_API_KEYS"  # secrets come from the environment only


@dataclass(frozen=True)
class Target:
    """What should be served: the champion, and the challenger when shadow mode is on."""

    champion: str
    challenger: str | None = None


def current_target(config: GenloopConfig) -> Target | None:
    """The versions the aliases name now; None without a champion."""
    registry = Registry(config)
    champion = registry.alias_version("champion")
    if champion is None:
        return None
    challenger = registry.alias_version("challenger") if config.serving.shadow_percent > 0 else None
    if challenger is not None and challenger.version == champion.version:
        challenger = None
    return Target(str(champion.version), str(challenger.version) if challenger is not None else None)


SALT_FILE = "client-salt"


def client_salt(config: GenloopConfig) -> str:
    """This installation's secret for hashing client ids in the inference log: made on first use,
    kept in the state folder readable by its owner alone, the same for every replica and restart
    (so one client keeps one pseudonym)."""
    path = config.home / SALT_FILE
    if not path.exists():
        config.home.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{SALT_FILE}.{os.getpid()}")
        with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            file.write(secrets.token_hex(32))
        try:
            os.link(draft, path)  # appears whole or not at all; the first of two racing processes wins
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text(encoding="ascii").strip()


def settings_for(config: GenloopConfig, version: str) -> ServerSettings:
    registry = Registry(config)
    model_version = registry.resolve(version)
    check_weights(registry.local_path(model_version))
    serving = config.serving
    if serving.engine == "vllm":
        from genloop.serving.vllm_engine import VLLMEngine as engine_class

        options = None
    else:
        from genloop.serving.hf.engine import HFEngine as engine_class

        options = serving.hf_options()
    keys = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    return ServerSettings(
        served_model_name=serving.model_name,
        model_uri=model_version.source,  # fetched by each replica on its own node
        registry_uri=registry.tracking_server,
        model_version=str(model_version.version),
        engine_class=engine_class,
        engine_options=options,
        api_keys=keys,
        max_body_bytes=serving.max_body_bytes,
        body_timeout_s=serving.body_timeout_s,
        public_paths=serving.public_paths,
        max_requests_per_client=serving.max_requests_per_client,
        inference_log_dir=str(config.inference_log_dir) if serving.inference_log else None,
        log_text=config.monitoring.log_text,
        log_flush_s=serving.inference_log_flush_s,
        client_salt=client_salt(config),
        shadow_percent=serving.shadow_percent,
        scrape_targets_dir=str(config.scrape_targets_dir),
    )


def deploy(config: GenloopConfig, target: Target) -> Target:
    """Deploy (or roll to) ``target``; returns once its replicas are serving."""
    settings = settings_for(config, target.champion)
    shadow = settings_for(config, target.challenger) if target.challenger is not None else None
    serve_app(settings, APP_NAME, deployment=config.serving.deployment(), shadow=shadow)
    logger.info("serving v%s%s", target.champion,
                f" with v{target.challenger} in shadow ({config.serving.shadow_percent:g} %)" if shadow else "")
    return target


class ChampionWatcher:
    """Polls the ``champion`` (and ``challenger``) aliases and rolls the app to each new version they name.

    ``serving`` is None while nothing is deployed yet (``genloop up`` bootstrapping): the first
    champion is then deployed. ``poke`` checks at once instead of at the next tick (the admin API
    calls it after moving an alias)."""

    def __init__(self, config: GenloopConfig, serving: Target | None):
        self.config = config
        self.serving = serving
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)

    def start(self) -> ChampionWatcher:
        self._thread.start()
        return self

    def check_once(self) -> bool:
        """Roll to the aliases' versions if they changed; True when a rollout happened."""
        target = current_target(self.config)
        if target is None or target == self.serving:
            return False
        logger.info("aliases moved %s → %s: rolling out", self.serving, target)
        first = self.serving is None
        self.serving = deploy(self.config, target)
        if not first:
            metrics.MODEL_SWAPS.inc()
        return True

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.serving.watch_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_once()
            except Exception:  # a failed rollout keeps the old version serving; try again next tick
                logger.exception("rollout failed; still serving %s", self.serving)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)


def start_serving(config: GenloopConfig, bootstrapping: bool = False) -> ChampionWatcher:
    """Start Serve over HTTP with the champion and a watcher that follows the aliases. With no
    champion yet and ``bootstrapping``, ``/health`` says so until the watcher deploys the first one."""
    target = current_target(config)
    if target is None and not bootstrapping:
        raise UserInputError("no champion to serve: promote a version first (genloop promote VERSION)")
    connect(config.ray)
    serve.start(http_options={"host": config.serving.host, "port": config.serving.port})
    if target is None:
        announce_waiting("bootstrapping", APP_NAME)
        return ChampionWatcher(config, None).start()
    return ChampionWatcher(config, deploy(config, target)).start()


def stop_serving(own_cluster: bool) -> None:
    """Delete the app, which drains it: replicas answer what they hold and what is queued for them
    (up to ``graceful_shutdown_timeout_s``) before they exit, while the proxy still routes. On a
    cluster we joined, Serve stays up for whoever else uses it; on our own, it stops too."""
    delete_app(APP_NAME)
    if own_cluster:
        serve.shutdown()
