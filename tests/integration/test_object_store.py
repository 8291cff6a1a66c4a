"""Models in object storage: MLflow's artifacts on a real S3 API server, fetched once per node.

The S3 server is moto's standalone server on loopback, started here; MLflow writes to it through
its own S3 artifact repository (boto3), with the endpoint and credentials from the standard
variables an operator sets. Each process that needs a version (a replica, the gate) fetches it into
its node's cache; two on one node download it once, and a node's cache serves it after the store is
gone.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.serving.model_store import CACHE_ENV

pytestmark = pytest.mark.slow

BUCKET = "genloop-test"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[tuple[dict[str, str], Path]]:
    """The S3 variables of a moto server started here, and the file its request log goes to."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    variables = {"AWS_ACCESS_KEY_ID": "genloop", "AWS_SECRET_ACCESS_KEY": "genloop-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield variables, log
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(timeout=30)


def _fetch_in_process(uri: str, version: str, cache: Path, env: dict[str, str]) -> subprocess.Popen:
    code = (f"from genloop.serving.model_store import local_model; "
            f"print(local_model({uri!r}, {version!r}))")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env, CACHE_ENV: str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_version_in_s3_is_fetched_once_per_node(s3, tmp_path, make_tiny_model, register_model):
    variables, requests = s3
    config = GenloopConfig(home=tmp_path / "home", tracking={"artifact_location": f"s3://{BUCKET}/mlflow"})
    trained = make_tiny_model()
    version = register_model(config, trained)
    registry = Registry(config)
    source = registry.resolve(version).source
    assert source.startswith(f"s3://{BUCKET}/mlflow/")  # nothing of the model under GENLOOP_HOME
    assert not (config.home / "mlartifacts").exists()

    # Two replicas starting on one node at once: one download, one folder, the files as trained.
    node = tmp_path / "node-a-cache"
    replicas = [_fetch_in_process(source, version, node, variables) for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in replicas]
    assert [process.returncode for process in replicas] == [0, 0], outputs
    folders = {Path(out.strip()) for out, _ in outputs}
    assert len(folders) == 1 and next(iter(folders)).parent == node, folders
    assert [p.name for p in node.iterdir() if not p.name.endswith(".lock")] == [next(iter(folders)).name]
    digest = hashlib.sha256((trained / WEIGHTS).read_bytes()).hexdigest()
    assert hashlib.sha256((next(iter(folders)) / WEIGHTS).read_bytes()).hexdigest() == digest
    weights_gets = [line for line in requests.read_text().splitlines() if "GET" in line and WEIGHTS in line]
    assert len(weights_gets) == 1, weights_gets

    # The control plane's check on another node fetches its own copy into that node's cache.
    other = tmp_path / "node-b-cache"
    os.environ[CACHE_ENV] = str(other)
    try:
        assert registry.local_path(registry.resolve(version)).parent == other
    finally:
        del os.environ[CACHE_ENV]

    # A cached version needs no store: a replica restarting while S3 is unreachable still starts.
    offline = {**variables, "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    again = _fetch_in_process(source, version, node, offline)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and Path(out.strip()) in folders, err
