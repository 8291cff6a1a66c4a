"""Seconds to the first answered request: `genloop up` against the commands an operator strung together.

Two situations, the same tiny settings (a few dozen small training steps on 400 documents of Python's
docs), real processes, real HTTP, one state folder per system:

- empty state. Baseline: `genloop data ingest builtin:python-docs` → `genloop train` → `genloop promote`
  → `genloop serve`, each started when the previous one ends (what the README asked of an operator
  before `genloop up`). Ours: `genloop up`, which bootstraps the same way on its own.
- existing champion (the state each of them just built). Baseline: `genloop serve`. Ours:
  `genloop up`, which also starts the scheduler, the admin API and the control plane's metrics.

Each time runs from the first command's start to the first 200 of `POST /v1/completions`.

    python benchmarks/up_startup.py [--out benchmarks/results/up_startup.json]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path

TINY = {
    "GENLOOP_RAY__NUM_CPUS": "2", "GENLOOP_MONITORING__EXPORTER_PORT": "0", "GENLOOP_SERVING__REPLICA_CPUS": "0.25",
    "GENLOOP_DATA__MAX_DOCUMENTS_PER_SOURCE": "400", "GENLOOP_TOKENIZER__VOCAB_SIZE": "512",
    "GENLOOP_TRAIN__MAX_STEPS": "20", "GENLOOP_TRAIN__EVAL_EVERY": "10", "GENLOOP_TRAIN__WARMUP_STEPS": "2",
    "GENLOOP_TRAIN__BLOCK_SIZE": "64", "GENLOOP_TRAIN__MICRO_BATCH_SIZE": "8", "GENLOOP_TRAIN__NUM_WORKERS": "1",
    "GENLOOP_TRAIN__CPUS_PER_WORKER": "0.25", "GENLOOP_EVALUATION__MAX_TEXTS": "20", "GENLOOP_EVALUATION__PROMPTS": "4",
    "GENLOOP_GATE__LIVE_PROMPTS": "0", "GENLOOP_SCHEDULER__DATASET": "docs",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def genloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def first_answer(process: subprocess.Popen, url: str, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.post(f"{url}/v1/completions", timeout=30,
                          json={"model": "genloop", "prompt": "The list", "max_tokens": 4}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{process.args}: no answer in {timeout} s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()


def timed_server(command: list[str], env: dict, url: str, before: list[list[str]] = ()) -> float:
    """Seconds from the first of ``before`` (run one after another) to ``command``'s first answer."""
    started = time.monotonic()
    for step in before:
        subprocess.run(step, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first_answer(process, url)
        return time.monotonic() - started
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "up_startup.json")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {"empty state": {}, "existing champion": {}}
    with tempfile.TemporaryDirectory() as root:
        for system in ("baseline", "genloop up"):
            port = free_port()
            env = {key: value for key, value in os.environ.items() if not key.startswith(("GENLOOP_", "RAY_"))}
            env.update(TINY, GENLOOP_HOME=str(Path(root) / system.replace(" ", "-")),
                       GENLOOP_SERVING__PORT=str(port), GENLOOP_SERVICE__ADMIN_PORT=str(free_port()))
            url = f"http://127.0.0.1:{port}"
            if system == "baseline":
                steps = [genloop("data", "ingest", "builtin:python-docs", "--name", "docs"),
                         genloop("train", "--dataset", "docs"), genloop("promote", "1")]
                results["empty state"][system] = timed_server(genloop("serve"), env, url, steps)
                results["existing champion"][system] = timed_server(genloop("serve"), env, url)
            else:
                results["empty state"][system] = timed_server(genloop("up"), env, url)
                results["existing champion"][system] = timed_server(genloop("up"), env, url)
    report = {
        "what": "seconds from the first command to the first answered completion (tiny settings, 2 CPUs)",
        "baseline": "empty: data ingest → train → promote → serve, one after another; champion: genloop serve",
        **{situation: {**{k: round(v, 1) for k, v in times.items()},
                       "ratio_up_over_baseline": round(times["genloop up"] / times["baseline"], 2)}
           for situation, times in results.items()},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
