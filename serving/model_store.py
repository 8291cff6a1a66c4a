"""A model version's files, on the node that needs them.

The registry records where a version's Hugging Face folder lives as an artifact URI: a folder under
``file://`` on one box, ``s3://…`` (or any store MLflow has an artifact repository for) on a
cluster, ``mlflow-artifacts:/…`` behind a tracking server. Whatever runs a model (a Serve replica,
the gate, a training worker warm-starting from it) calls ``local_model`` on its own node: a folder
that already exists there is used as it is, anything else is downloaded once per node into the
node's cache and reused by every process on it.

The cache (``GENLOOP_MODEL_CACHE`` on that node, default ``~/.cache/genloop/models``, as Hugging
Face and vLLM keep theirs) holds one folder per version and URI. Two replicas starting on one node
download it once: a lock file serialises them, the download goes to a private folder and is
renamed into place whole, so a reader never sees a half-written model and a killed download leaves
only a stray private folder that the next download replaces.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import unquote, urlparse

from genloop.training.errors import UserInputError

CACHE_ENV = "GENLOOP_MODEL_CACHE"


def node_cache() -> Path:
    """This node's model cache."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genloop" / "models"


def _local_folder(uri: str) -> Path | None:
    """The folder ``uri`` names when it is a plain path or a ``file://`` URI, else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return Path(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return None


def local_model(uri: str, version: str, *, tracking_uri: str | None = None, cache: Path | None = None) -> Path:
    """A folder on this node holding the files at ``uri`` (registry version ``version``).

    ``tracking_uri`` resolves ``mlflow-artifacts:/`` URIs (a tracking server's proxied store);
    ``cache`` overrides the node's cache folder."""
    folder = _local_folder(uri)
    if folder is not None:
        if folder.is_dir():
            return folder
        raise UserInputError(  # a configuration to fix, said in one line (a CLI's exit 2), not a traceback
            f"model v{version} is at {uri}, which is not on this node ({socket.gethostname()}): on more than one "
            "machine, keep MLflow's artifacts where every node reaches them (tracking.artifact_location: s3://…, "
            "or a shared filesystem)")
    cache = cache or node_cache()
    target = cache / f"v{version}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process on this node may be fetching it right now
        if target.is_dir():
            return target
        draft = cache / f".{target.name}.{os.getpid()}"
        shutil.rmtree(draft, ignore_errors=True)  # what a download killed in this pid's past left
        import mlflow.artifacts  # here: a replica serving a local folder never pays for importing MLflow

        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(draft),
                                                           tracking_uri=tracking_uri))
        fetched.rename(target)  # whole or not at all
        shutil.rmtree(draft, ignore_errors=True)
    return target
