"""`genloop serve --address` onto a separately started Ray cluster, on the HTTP port `--port` names, and
Ctrl-C draining in-flight requests.

Everything is real and out of process: a head node from `ray start --head`, the `genloop serve`
command, HTTP clients. SIGINT (what Ctrl-C sends) arrives while requests are still queued; each
of them must still get its answer, the command must exit cleanly, and the cluster must live on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from genloop.services.cluster import SERVE_START_ENV
from genloop.services.registry import Registry

pytestmark = pytest.mark.slow


def _ray(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_serve_onto_existing_cluster_and_ctrl_c_drains(genloop_config, make_tiny_model, register_model, tmp_path,
                                                       free_port):
    config = genloop_config
    version = register_model(config, make_tiny_model())
    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", version)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        gcs_port = sock.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "GENLOOP_"))}
    # Ray 2.60's `ray start` turns token authentication on; this loopback cluster does without. Serve's
    # start-up settings go in the cluster's environment, as the README tells operators to.
    env.update(GENLOOP_HOME=str(config.home), GENLOOP_SERVING__MAX_BATCH_SIZE="1",
               GENLOOP_MONITORING__EXPORTER_PORT="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               **SERVE_START_ENV)
    # --block keeps the head in the foreground: terminating it stops this cluster alone, not the
    # test session's Ray (`ray stop` would stop every Ray on the machine). Without a drain timeout of
    # 0 its SIGTERM waits up to 30 s for the Serve application this test leaves on it to drain.
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={gcs_port}", "--num-cpus=1", "--include-dashboard=false"],
                            env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{gcs_port}"
    deadline = time.time() + 120
    while _ray("status", f"--address={address}", env=env).returncode != 0:
        assert time.time() < deadline and head.poll() is None, "ray start --head failed"
        time.sleep(1)
    # PYTHONFAULTHANDLER: should it hang, SIGABRT makes it print every thread's stack (see below).
    # Started with SIGINT ignored, as a background job of a non-interactive shell is: Ctrl-C must still drain.
    server = subprocess.Popen([sys.executable, "-m", "genloop.services.cli", "serve", "--address", address,
                               "--host", "127.0.0.1", "--port", str(free_port)],
                              env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []  # read all along: a full pipe would block the server's writes
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{free_port}"
        exporter_target = config.scrape_targets_dir / "control-plane.json"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert server.poll() is None, "".join(lines)
            try:  # ready once it serves and the control plane's metrics are announced
                if httpx.get(f"{url}/health", timeout=2).status_code == 200 and exporter_target.exists():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("genloop serve did not become healthy")

        def ask(i: int) -> tuple[int, str | None]:
            response = httpx.post(f"{url}/v1/completions", timeout=120,
                                  json={"model": "genloop", "prompt": f"Request {i}", "max_tokens": 40})
            return response.status_code, response.headers.get("x-genloop-model-version")

        with ThreadPoolExecutor(10) as pool:
            answers = [pool.submit(ask, i) for i in range(10)]
            time.sleep(0.5)  # requests in flight and queued (one sequence at a time), then Ctrl-C
            server.send_signal(signal.SIGINT)
            results = [answer.result() for answer in answers]
        assert results == [(200, version)] * 10
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is stuck
            server.wait(timeout=30)
            reader.join(timeout=10)
            pytest.fail("genloop serve did not stop after Ctrl-C:\n" + "".join(lines)[-12000:])
        reader.join(timeout=30)
        output = "".join(lines)
        assert server.returncode == 0, output
        assert "draining" in output
        assert not exporter_target.exists()  # no stale scrape target left behind
        status = _ray("status", f"--address={address}", env=env)
        assert status.returncode == 0, status.stderr  # the cluster is not ours to stop
    finally:
        if server.poll() is None:
            server.kill()
        head.terminate()
        head.wait(timeout=60)
