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


@pytest.fixture(scope="session")
def make_tiny_model():
    """Build, briefly train (20 AdamW steps, in-process) and save a tiny GPT-2 with its tokenizer."""
    import pydoc_data.topics
    import torch

    from training.models import build_model
    from training.tokenizer import train_tokenizer

    texts = [p for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p) > 80][:400]
    tokenizer = train_tokenizer(texts, vocab_size=512)

    def make(folder: Path, seed: int = 0) -> Path:
        model = build_model("tiny", tokenizer, block_size=64, seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = torch.tensor(tokenizer("\n".join(texts))["input_ids"][: 20 * 8 * 64]).view(20, 8, 64)
        for batch in ids:
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return make


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def register_model():
    """Register a model folder as a new version in the config's MLflow registry (no Ray Train run)."""
    from services.registry import MODEL_ARTIFACT, Registry

    def register(config, folder: Path, tags: dict[str, str] | None = None) -> str:
        registry = Registry(config)
        run = registry.client.create_run(registry.experiment_id())
        registry.client.log_artifacts(run.info.run_id, str(folder), MODEL_ARTIFACT)
        registry.client.set_terminated(run.info.run_id, "FINISHED")
        return str(registry.register(run.info.run_id, tags=tags or {"dataset": "test:v1"}).version)

    return register


@pytest.fixture
def make_docs_dataset():
    """Write dataset ``docs:v1`` of a config: pydoc paragraphs, shuffled, half train and ten validation.

    Returns the other half: texts of the same domain the dataset does not hold.
    """
    import json
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pydoc_data.topics

    from training.datasets import MANIFEST_FILE, TRAIN_FILE, VALIDATION_FILE

    def make(config) -> list[str]:
        docs = [p for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p.split()) >= 8]
        random.Random(0).shuffle(docs)
        folder = config.datasets_dir / "docs" / "v1"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"text": docs[: len(docs) // 2]}), folder / TRAIN_FILE)
        pq.write_table(pa.table({"text": docs[:10]}), folder / VALIDATION_FILE)
        (folder / MANIFEST_FILE).write_text(json.dumps({"content_hash": "docs", "counts": {}, "created_at": "now"}))
        return docs[len(docs) // 2:]

    return make
