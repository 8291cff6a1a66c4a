"""Connecting to Ray: an embedded local instance by default, an existing cluster when configured."""

from __future__ import annotations

import logging

import ray
import ray.data

from services.config import RayConfig

logger = logging.getLogger(__name__)


def connect(settings: RayConfig) -> None:
    """Start or join Ray once per process; a no-op when already connected."""
    # Per-operator bars from every worker drown the one progress bar that matters.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if settings.address:
        logger.info("joining Ray cluster at %s", settings.address)
        ray.init(address=settings.address, logging_level=logging.WARNING)
    else:
        # "local" always starts a fresh instance: without it, ray.init() joins whatever cluster a past
        # `ray start` on this machine recorded in /tmp/ray — even one that has since died.
        ray.init(address="local", num_cpus=settings.num_cpus, logging_level=logging.WARNING)
