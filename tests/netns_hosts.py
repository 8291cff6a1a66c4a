"""Hosts simulated on this machine with network namespaces, and what tests on them need: a TCP relay,
waiting on a condition while watching processes, and what is left of a node cut off.

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


def kill_namespace(namespace: str) -> None:
    """SIGKILL every process in ``namespace``: what is left of a node whose host was cut off."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True).stdout
    for pid in map(int, pids.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
