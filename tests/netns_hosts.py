"""Hosts simulated on this machine with network namespaces, and what tests on them need: a TCP relay,
waiting on a condition while watching processes, and faults (a killed raylet, a cut link).

Only for tests that create their own namespaces (``tests/integration/test_two_nodes.py``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def relay(listen: tuple[str, int], target: tuple[str, int], stop: threading.Event) -> None:
    """A TCP relay: PostgreSQL listens on this host's loopback only, which no namespace reaches."""
    server = socket.create_server(listen)
    server.settimeout(0.5)

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def serve() -> None:
        with server:
            while not stop.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(target)
                for ends in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pipe, args=ends, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(condition, what: str, timeout: float, *processes: subprocess.Popen, logs: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            told = "".join(f"\n{log.name}:\n{log.read_text()[-3000:]}" for log in sorted(logs.glob("*.log"))) \
                if logs else ""
            assert process.poll() is None, f"{what}: a process exited ({process.args}){told}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.5)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def s3_client(cluster: dict):
    """A boto3 client of the cluster's S3 server, with its credentials."""
    import boto3

    aws = cluster["aws"]
    return boto3.client("s3", endpoint_url=cluster["s3"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def keys(s3, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` in ``bucket``."""
    return [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])]


def kill_raylet(namespace: str) -> int:
    """SIGKILL the raylet running in ``namespace``, as a crashed or lost host would leave it; its pid."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True).stdout
    for pid in map(int, pids.split()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if command.endswith(b"/raylet"):
            os.kill(pid, signal.SIGKILL)
            return pid
    raise AssertionError(f"no raylet in {namespace}")


def kill_namespace(namespace: str) -> None:
    """SIGKILL every process in ``namespace``: what is left of a node whose host was cut off."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True).stdout
    for pid in map(int, pids.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
