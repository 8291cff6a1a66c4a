"""genloop's loop on a two-node Ray cluster, each node a network namespace with its own address.

Real all the way: ``ray start`` in two namespaces (``ip netns`` + veth on a bridge, as root), an S3
API server (moto) and the machine's PostgreSQL reached over the bridge, and genloop's CLI run on the
head node as an operator runs it, from a ``genloop.yaml`` that differs from the default in URLs (and
in test sizes). Both nodes share this machine's filesystem, so each gets caches of its own through
its environment, and nothing genloop hands across the cluster may be a path: datasets, checkpoints,
models and the inference log travel through the bucket, state through PostgreSQL.

Where namespaces cannot be made (not root, no ``ip``), the module is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from netns_hosts import answers, free_port, ip, kill_namespace, relay, wait
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from genloop.services.cluster import SERVE_DATA_PLANE_ENV, SERVE_START_ENV
from genloop.serving.proxy_errors import PROXY_ENV

pytestmark = pytest.mark.slow

BUCKET = "genloop-cluster"
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def network() -> Iterator[dict[str, str]]:
    """A bridge on this host (the "network") and two namespaces on it: head and worker."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = f"{os.getpid() % 10000}"
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    bridge, names = f"glbr{tag}", {"head": f"gl-head-{tag}", "worker": f"gl-work-{tag}"}
    addresses = {"bridge": f"{subnet}.1", "head": f"{subnet}.2", "worker": f"{subnet}.3"}
    made: list[list[str]] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        made.append(["link", "del", bridge])
        ip("addr", "add", f"{addresses['bridge']}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for role, namespace in names.items():
            ip("netns", "add", namespace)
            made.append(["netns", "del", namespace])
            host_end, node_end = f"{namespace[:7]}{tag}h", f"{namespace[:7]}{tag}n"
            ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            ip("link", "set", host_end, "master", bridge, "up")
            ip("link", "set", node_end, "netns", namespace)
            for args in (["addr", "add", f"{addresses[role]}/24", "dev", node_end], ["link", "set", node_end, "up"],
                         ["link", "set", "lo", "up"]):
                ip("netns", "exec", namespace, "ip", *args)
    except subprocess.CalledProcessError as exc:
        for undo in reversed(made):
            subprocess.run(["ip", *undo], capture_output=True)
        pytest.skip(f"network namespaces refused here: {exc.stderr.strip()}")
    yield {**addresses, "head_ns": names["head"], "worker_ns": names["worker"],
           "head_if": f"{names['head'][:7]}{tag}n", "worker_if": f"{names['worker'][:7]}{tag}n",
           "worker_link": f"{names['worker'][:7]}{tag}h"}  # the worker's cable, on the bridge's side
    for undo in reversed(made):
        subprocess.run(["ip", *undo], capture_output=True)


@pytest.fixture(scope="module")
def cluster(network, tmp_path_factory) -> Iterator[dict]:
    """Two Ray nodes, moto and a PostgreSQL relay on the bridge, the databases and genloop.yaml."""
    root = tmp_path_factory.mktemp("cluster")
    bridge = network["bridge"]
    started: list[subprocess.Popen] = []
    temp_dirs: list[Path] = []
    stop = threading.Event()
    pg_port, s3_port, gcs_port = free_port(), free_port(), free_port()
    relay((bridge, pg_port), ("127.0.0.1", 5432), stop)
    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", poolclass=NullPool,
                          isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        admin.connect().close()
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the server is not there
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({type(exc).__name__})")
    databases = {role: f"genloop_cluster_{role}_{uuid.uuid4().hex[:8]}" for role in ("mlflow", "state")}
    with admin.connect() as connection:
        for name in databases.values():
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    s3 = f"http://{bridge}:{s3_port}"
    aws = {"AWS_ACCESS_KEY_ID": "genloop", "AWS_SECRET_ACCESS_KEY": "genloop-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3}
    base_env = {key: value for key, value in os.environ.items() if not key.startswith(("GENLOOP_", "RAY_", "AWS_"))}
    base_env.update(aws, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    try:
        started.append(subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", bridge,
                                         "-p", str(s3_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait(lambda: answers(f"{s3}/moto-api/"), "moto", 60, *started)
        import boto3

        boto3.client("s3", endpoint_url=s3, **{k.lower(): v for k, v in aws.items()
                                              if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        nodes = {}

        def start(role: str) -> None:
            """``ray start`` in the role's namespace; it joins the head, and exits when its raylet dies."""
            node_env = {**base_env, **SERVE_DATA_PLANE_ENV, **SERVE_START_ENV, **PROXY_ENV,
                        "GENLOOP_MODEL_CACHE": str(root / role / "models"),
                        "GENLOOP_SPOOL_DIR": str(root / role / "spool"),
                        # Both namespaces share this machine's hostname, which resolves to loopback: gloo
                        # (torch.distributed on CPU) must be told the node's own interface, as on any host
                        # whose hostname does not resolve to the address the other nodes reach.
                        "GLOO_SOCKET_IFNAME": network[f"{role}_if"]}
            place = (["--head", f"--port={gcs_port}", "--include-dashboard=false"] if role == "head"
                     else [f"--address={network['head']}:{gcs_port}"])
            # Three CPUs a node: a training worker (1) and a replica (0.5) on each still leave a whole CPU
            # on some node for Ray Data's read tasks, which a CPU split in halves over two nodes would not.
            # Ray's sockets live in its temp dir, and a Unix socket's path has at most 107 bytes.
            temp = Path(tempfile.mkdtemp(prefix=f"gl-{role}-", dir="/tmp"))
            temp_dirs.append(temp)
            with (root / f"ray-{role}.log").open("a") as log:
                started.append(subprocess.Popen(
                    ["ip", "netns", "exec", network[f"{role}_ns"], RAY, "start", "--block", *place,
                     f"--node-ip-address={network[role]}", "--num-cpus=3", f"--temp-dir={temp}"],
                    env={**node_env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, stdout=log,
                    stderr=subprocess.STDOUT))
            nodes[role] = node_env

        start("head")
        wait(lambda: _ray_status(network, gcs_port, base_env) >= 1, "ray head", 120, *started, logs=root)
        start("worker")
        wait(lambda: _ray_status(network, gcs_port, base_env) >= 2, "ray worker node", 120, *started, logs=root)

        def restart_worker() -> None:
            """The worker node again, after a fault took it down (a new node to Ray, the same address)."""
            start("worker")
            wait(lambda: _ray_status(network, gcs_port, base_env) >= 2, "worker node back", 120, started[-1],
                  logs=root)

        def url(role: str) -> str:
            return f"postgresql+psycopg://postgres@{bridge}:{pg_port}/{databases[role]}"

        config = {
            "ray": {"address": f"{network['head']}:{gcs_port}", "storage_path": f"s3://{BUCKET}/ray"},
            "datasets_uri": f"s3://{BUCKET}/datasets",
            "inference_log_uri": f"s3://{BUCKET}/inference-log",
            "tracking": {"tracking_uri": url("mlflow"), "artifact_location": f"s3://{BUCKET}/mlflow"},
            "state_db_url": url("state"),
            "scheduler": {"job_store_url": url("state")},
            # test sizes, and where the replicas and workers go
            "data": {"max_documents_per_source": 300},
            "tokenizer": {"vocab_size": 512},
            "train": {"max_steps": 20, "eval_every": 10, "eval_batches": 1, "micro_batch_size": 4,
                      "num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD"},
            "evaluation": {"max_texts": 20, "prompts": 4, "max_new_tokens": 8},
            "serving": {"num_replicas": 2, "max_replicas_per_node": 1, "replica_cpus": 0.5, "max_batch_size": 4},
            "monitoring": {"exporter_port": 0},
        }
        config_file = root / "genloop.yaml"
        config_file.write_text(yaml.safe_dump(config))
        cli_env = {**nodes["head"], "GENLOOP_HOME": str(root / "control-plane")}
        yield {"network": network, "config_file": config_file, "env": cli_env, "root": root, "aws": aws,
               "databases": databases, "s3": s3, "restart_worker": restart_worker}
    finally:
        stop.set()
        for process in reversed(started):
            process.send_signal(signal.SIGTERM)
        for process in reversed(started):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        with admin.connect() as connection:
            for name in databases.values():
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        for temp in temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def _ray_status(network: dict, port: int, env: dict) -> int:
    """Alive nodes of the cluster, as ``ray status`` on the head node counts them."""
    result = subprocess.run(["ip", "netns", "exec", network["head_ns"], RAY, "status",
                             f"--address={network['head']}:{port}"], env=env, capture_output=True, text=True,
                            timeout=60)
    active = result.stdout.partition("Active:")[2].partition("Pending:")[0]
    return sum(line.strip().startswith("1 node_") for line in active.splitlines()) if result.returncode == 0 else 0


def genloop(cluster: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A genloop command on the head node, as an operator runs it there."""
    command = ["ip", "netns", "exec", cluster["network"]["head_ns"], sys.executable, "-m", "genloop.services.cli",
               *args]
    started = time.monotonic()
    result = subprocess.run(command, env=cluster["env"], capture_output=True, text=True, timeout=timeout)
    print(f"genloop {' '.join(args[:2])}: {time.monotonic() - started:.1f} s (exit {result.returncode})")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


CLIENTS = 4


def _load(base: str, answered: list[tuple[int, str | None, str]], stop: threading.Event) -> None:
    """One client in a closed loop until ``stop``: (status, model version, request id or error) per request."""
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            try:
                response = http.post(f"{base}/v1/completions", json={
                    "model": "genloop", "prompt": "The list", "max_tokens": 6})
                answered.append((response.status_code, response.headers.get("x-genloop-model-version"),
                                 response.json().get("id", "") if response.status_code == 200 else response.text))
            except httpx.HTTPError as exc:
                answered.append((0, None, repr(exc)))


@contextmanager
def _under_load(base: str, server: subprocess.Popen) -> Iterator[list[tuple[int, str | None, str]]]:
    """CLIENTS clients in closed loops while the block runs (it starts once they have 20 answers); the
    list of what each request got grows meanwhile."""
    answered: list[tuple[int, str | None, str]] = []
    stop = threading.Event()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(CLIENTS):
            pool.submit(_load, base, answered, stop)
        try:
            wait(lambda: len(answered) >= 20, "load", 120, server)
            yield answered
        finally:
            stop.set()


def test_the_loop_on_two_nodes(cluster, monkeypatch):
    from mlflow.tracking import MlflowClient
    from openai import OpenAI

    from genloop.serving.inference_log import read_inference_log

    network, root, config = cluster["network"], cluster["root"], ["--config", str(cluster["config_file"])]
    genloop(cluster, "data", "ingest", "builtin:python-docs", "--name", "docs", *config)
    genloop(cluster, "train", "--dataset", "docs", "--preset", "tiny", *config)

    # The training workers ran one on each node; the model is in the bucket, its record in PostgreSQL.
    # (A raylet killed mid-run resumed on the head in three runs of four, and hung in the fourth, on CI:
    # that fault is left out until the hang is understood.)
    tracking = f"postgresql+psycopg://postgres@127.0.0.1:5432/{cluster['databases']['mlflow']}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    first = client.get_model_version("genloop", "1")
    placed = client.get_run(first.run_id).data.tags["worker_nodes"].split()
    print(f"training workers: {placed}")
    assert {node.split("@")[1] for node in placed} == {network["head"], network["worker"]}
    assert first.source.startswith(f"s3://{BUCKET}/mlflow/")
    genloop(cluster, "promote", "1", *config)  # the gate, reading the held-out sets from the bucket

    lines: list[str] = []
    started = time.monotonic()
    server = subprocess.Popen(["ip", "netns", "exec", network["head_ns"], sys.executable, "-m",
                               "genloop.services.cli", "serve", "--host", "0.0.0.0", "--port", "8000", *config],
                              env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=lambda: lines.extend(server.stdout or []), daemon=True).start()
    base = f"http://{network['head']}:8000"
    try:
        wait(lambda: answers(f"{base}/health") and httpx.get(f"{base}/health").status_code == 200,
              "genloop serve", 300, server)
        print(f"genloop serve: healthy after {time.monotonic() - started:.1f} s")
        # A replica per node (max_replicas_per_node: 1; Serve's own spreading is best effort, and CI once
        # put both on the head), each of which fetched v1 from the bucket into its node's own cache.
        assert all(any((root / role / "models").glob("v1-*")) for role in ("head", "worker"))
        openai = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        completion = openai.completions.create(model="genloop", prompt="The for statement", max_tokens=8)
        assert completion.choices[0].text and completion.usage.completion_tokens > 0

        # v2, warm-started from v1 while v1 serves; promoted under load: a rolling update over both nodes.
        genloop(cluster, "train", "--dataset", "docs", "--base", "1", *config)
        with _under_load(base, server) as answered:
            rollout = time.monotonic()
            genloop(cluster, "promote", "2", "--force", "--reason", "rollout on two nodes", *config)
            wait(lambda: sum(version == "2" for _, version, _ in answered) >= 20, "v2 answering", 300, server)
            print(f"rollout: v2 answering 20 requests {time.monotonic() - rollout:.1f} s after the promotion")
        failures = [entry for entry in answered if entry[0] != 200]
        assert not failures, failures[:5]
        print(f"rollout under load: {len(answered)} requests, {len(failures)} failed")
        # The rollout replaces the replicas one node at a time (v2 answered above may be the first alone):
        # each node fetches v2 for its own.
        wait(lambda: all(any((root / role / "models").glob("v2-*")) for role in ("head", "worker")),
             "v2 fetched onto each node", 180, server)

        # Fault: the worker node's link cut under load. The head's replica answers on; what fails is at
        # most what was in flight on the worker's replica (a client holds one request at a time).
        with _under_load(base, server) as cut_off:
            ip("link", "set", network["worker_link"], "down")
            at_cut = len(cut_off)
            wait(lambda: sum(status == 200 for status, _, _ in cut_off[at_cut:]) >= 40,
                 "the head's replica answering alone", 240, server)
        failed = [entry for entry in cut_off if entry[0] != 200]
        print(f"link cut under load: {len(cut_off)} requests, {len(failed)} failed: {failed[:CLIENTS]}")
        assert len(failed) <= CLIENTS
        answered += cut_off
        # The host comes back as a new node: what was left of the old one is killed, its replica's spool
        # stays on the node's disk, and the replica Serve starts there writes it out to the bucket.
        ip("link", "set", network["worker_link"], "up")
        kill_namespace(network["worker_ns"])
        cluster["restart_worker"]()
        for name, value in cluster["aws"].items():
            monkeypatch.setenv(name, value)
        served = {request_id for status, _, request_id in answered if status == 200}
        wait(lambda: served <= set(read_inference_log(f"s3://{BUCKET}/inference-log").column("request_id")
                                   .to_pylist()), "every answer's log row in the bucket", 300, server)
    finally:
        server.send_signal(signal.SIGINT)  # drains: replicas answer what they hold and write their log rows
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0, "".join(lines)[-4000:]

    # Every answer has its row in the log in the bucket, written by replicas on both nodes.
    rows = read_inference_log(f"s3://{BUCKET}/inference-log")
    ids = set(rows.column("request_id").to_pylist())
    assert {request_id for status, _, request_id in answered if status == 200} <= ids
    import boto3

    parts = [item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="inference-log/")
             .get("Contents", [])]
    writers = {key.rsplit("/part-", 1)[1].split("_")[1] for key in parts}  # part-<host>_<pid>_<spool>.parquet
    assert len(writers) >= 2, parts

    # The drift job, on the control plane, reads the same rows from the bucket (its host has no log).
    drift = json.loads(genloop(cluster, "drift", "--json", *config).stdout)
    print(f"drift: {drift['current_samples']} current prompts, verdict {drift['verdict']}")
    assert drift["current_samples"] >= min(len(ids), 2000) // 2
