"""The README's main job, `genloop demo`, end to end in a subprocess with a relative GENLOOP_HOME.

This is the command a new user runs first; it once failed only because Ray workers resolved the
relative default home against their own working directory, which no in-process test saw.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from services.config import GenloopConfig
from services.lifecycle import roles
from services.registry import Registry
from services.scheduler import JobHistory
from serving.inference_log import read_inference_log


def test_demo_runs_the_whole_loop(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GENLOOP_HOME": "state", "GENLOOP_DATA__MAX_DOCUMENTS_PER_SOURCE": "1500",
           "GENLOOP_TOKENIZER__VOCAB_SIZE": "1024", "GENLOOP_RAY__NUM_CPUS": "2", "COLUMNS": "160",
           "GENLOOP_SERVING__PORT": str(port)}
    result = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--max-steps", "30"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 2" in result.stdout and "is the champion" in result.stdout
    assert "retrain job:" in result.stdout and "served by v" in result.stdout and "drift job:" in result.stdout

    config = GenloopConfig(home=tmp_path / "state")
    versions = Registry(config).versions()
    assert len(versions) == 2 and versions[1].tags["parent_version"] == str(versions[0].version)
    assert roles(config).champion in {str(v.version) for v in versions}
    assert list((tmp_path / "state" / "reports" / "evaluations").glob("*.html"))
    served = read_inference_log(config.inference_log_dir)
    assert len(served) == 62 and set(served.column("status").to_pylist()) == {200}
    runs = {run.job: run for run in JobHistory(config.scheduler_db).recent()}
    assert runs["retrain"].outcome in ("promoted", "rejected") and runs["retrain"].reason == "demo"
    assert runs["drift"].outcome in ("no drift", "drift"), runs["drift"].detail  # 60 prompts: enough to judge
