"""Shared fixtures: one local Ray for the whole session, an isolated GENLOOP_HOME per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Environment overrides beat explicit config values: a GENLOOP_HOME set in the shell that runs the
# tests would send every test's state to one place.
for _name in [n for n in os.environ if n.startswith("GENLOOP_")]:
    del os.environ[_name]
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with the machine's two CPUs, shared by every test that needs it."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def genloop_config(tmp_path: Path):
    """A config whose whole state (datasets, MLflow SQLite, Ray storage) lives in ``tmp_path``."""
    from services.config import GenloopConfig

    return GenloopConfig(home=tmp_path / "home")
