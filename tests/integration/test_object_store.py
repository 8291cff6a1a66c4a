"""genloop's storage on a real S3 API server: models fetched once per node, dataset versions committed
by their manifest, the inference log written whole. (Training that reads and writes only the bucket
is test_two_nodes' subject.)

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
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
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


def test_dataset_versions_in_s3_are_committed_by_their_manifest(s3, ray_cluster):
    import boto3

    from genloop.training.config import DataConfig
    from genloop.training.dataset_store import (
        MANIFEST_FILE,
        TRAIN_FILE,
        list_versions,
        read_split,
        resolve_dataset,
        write_version,
    )
    from genloop.training.datasets import ingest

    root = f"s3://{BUCKET}/store-test"
    first = ingest(["builtin:python-docs"], "docs", DataConfig(max_documents_per_source=200), root).version
    assert first.path == f"{root}/docs/v1" and first.texts("train")

    # What a writer killed before its manifest leaves is no version, and the next one overwrites it.
    s3_client = boto3.client("s3")
    s3_client.put_object(Bucket=BUCKET, Key=f"store-test/docs/v2/{TRAIN_FILE}", Body=b"half a file")
    assert [v.version for v in list_versions(root, "docs")] == [1]
    assert resolve_dataset(root, "docs").version == 1
    second = ingest(["builtin:python-docs"], "docs", DataConfig(max_documents_per_source=300), root).version
    assert second.version == 2 and len(second.texts("train")) > len(first.texts("train"))

    # A write that fails leaves nothing behind; a version is never written twice.
    table = read_split(first.train_path)
    with pytest.raises(TypeError):
        write_version(f"{root}/docs", 3, [(table, table)], {"bad": object()})  # fails after the parts are written
    assert not s3_client.list_objects_v2(Bucket=BUCKET, Prefix="store-test/docs/v3/").get("Contents")
    with pytest.raises(FileExistsError):
        write_version(f"{root}/docs", 2, [(table, table)], {"content_hash": "again"})
    assert resolve_dataset(root, "docs:v2").manifest["content_hash"] == second.manifest["content_hash"]
    assert MANIFEST_FILE in [key["Key"].rsplit("/", 1)[1] for key in s3_client.list_objects_v2(
        Bucket=BUCKET, Prefix="store-test/docs/v2/")["Contents"]]


def test_the_inference_log_in_s3_keeps_what_a_killed_replica_spooled(s3, tmp_path, monkeypatch):
    """Replicas write the log to the bucket; one killed outright leaves its rows in its node's spool,
    and the next replica on that node writes them there. Drift's reader sees every row."""
    import signal
    from datetime import UTC, datetime, timedelta

    import boto3

    from genloop.serving.inference_log import (
        SPOOL_ENV,
        InferenceLog,
        InferenceRecord,
        caller_prompts,
        read_inference_log,
    )

    variables, _ = s3
    root = f"s3://{BUCKET}/inference-log"
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "node-spool"))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from genloop.serving.inference_log import InferenceLog, InferenceRecord\n"
        f"log = InferenceLog({root!r}, flush_seconds=3600)\n"
        "for i in range(20):\n"
        "    log.append(InferenceRecord(request_id=f'killed-{i}', route='completions', model_version='1',\n"
        "                               status=200, prompt=f'prompt {i}', output='answer'))\n"
        "print('logged', flush=True)\n"
        "time.sleep(600)\n")], env={**os.environ, **variables}, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "logged"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert read_inference_log(root).num_rows == 0  # its buffer died with it; its spool did not

    log = InferenceLog(root, flush_seconds=0.05)  # the next replica on this node
    assert log.recovered == 20
    for i in range(5):
        log.append(InferenceRecord(request_id=f"next-{i}", route="completions", model_version="1", status=200,
                                   prompt=f"later {i}", output="answer"))
    log.close()

    ids = sorted(read_inference_log(root).column("request_id").to_pylist())
    assert ids == sorted([f"killed-{i}" for i in range(20)] + [f"next-{i}" for i in range(5)])
    keys = [item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="inference-log/")
            ["Contents"]]
    assert all("/date=" in key and key.endswith(".parquet") and "/part-" in key for key in keys), keys
    assert not [path for path in (tmp_path / "node-spool").rglob("*") if path.is_file()]  # all written out
    assert len(caller_prompts(root, since=datetime.now(UTC) - timedelta(hours=1))) == 25
