"""Prometheus file-based service discovery: every process that exports metrics announces itself.

Serve routes ``GET /metrics`` to *one* replica, so scraping the proxy sees a different replica's
counters each time — wrong as soon as there are two. Instead each replica (and the control plane)
serves its own registry on its own port and writes a ``file_sd`` target file into one directory;
Prometheus watches that directory (``file_sd_configs``) and scrapes every process, and PromQL sums
over them. A file is written to a temporary name and renamed, so Prometheus never reads half of
one; it is removed when its process stops. On several nodes the directory must be shared (the
same requirement Ray Train's storage already has), or each node runs its own Prometheus agent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


class ScrapeTarget:
    """A metrics HTTP server on a free port, announced in ``directory`` until ``close``."""

    def __init__(self, directory: str | Path, name: str, labels: dict[str, str],
                 registry: CollectorRegistry | None = None, host: str | None = None, port: int = 0):
        self.file = Path(directory) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.json"
        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self._server, self._thread = start_http_server(port, addr="0.0.0.0", **kwargs)
        self.address = f"{host or _node_ip()}:{self._server.server_port}"
        self.file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.file.with_name(f".{self.file.name}.tmp")
        temporary.write_text(json.dumps([{"targets": [self.address], "labels": labels}]))
        os.replace(temporary, self.file)
        logger.info("metrics of %s at http://%s/metrics", name, self.address)

    def close(self) -> None:
        self.file.unlink(missing_ok=True)
        self._server.shutdown()
        self._server.server_close()


def _node_ip() -> str:
    """The address other machines reach this one at (Ray's view of it when Ray runs here)."""
    try:
        import ray.util

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray, fall back to the host's name resolution
        return socket.gethostbyname(socket.gethostname())
