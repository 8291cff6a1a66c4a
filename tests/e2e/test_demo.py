"""The README's main job, `genloop demo`, end to end in a subprocess with a relative GENLOOP_HOME.

This is the command a new user runs first; it once failed only because Ray workers resolved the
relative default home against their own working directory, which no in-process test saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.config import GenloopConfig
from services.lifecycle import roles
from services.registry import Registry


def test_demo_runs_the_whole_loop(tmp_path: Path):
    env = {**os.environ, "GENLOOP_HOME": "state", "GENLOOP_DATA__MAX_DOCUMENTS_PER_SOURCE": "1500",
           "GENLOOP_TOKENIZER__VOCAB_SIZE": "1024", "GENLOOP_RAY__NUM_CPUS": "2", "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--max-steps", "30"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 2" in result.stdout and "is the champion" in result.stdout

    config = GenloopConfig(home=tmp_path / "state")
    versions = Registry(config).versions()
    assert len(versions) == 2 and versions[1].tags["parent_version"] == str(versions[0].version)
    assert roles(config).champion in {str(v.version) for v in versions}
    assert list((tmp_path / "state" / "reports" / "evaluations").glob("*.html"))
