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
    """A real local Ray with the machine's two CPUs, shared by every test that needs it; Serve runs
    on the data plane ``genloop serve`` uses."""
    import ray
    import ray.data

    from genloop.services.cluster import use_fast_serve_data_plane

    if not ray.is_initialized():
        use_fast_serve_data_plane()
        ray.init(address="local", num_cpus=2, log_to_driver=True)  # never a stale `ray start` cluster
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def genloop_config(tmp_path: Path):
    """A config whose whole state (datasets, MLflow SQLite, Ray storage) lives in ``tmp_path``."""
    from genloop.services.config import GenloopConfig

    return GenloopConfig(home=tmp_path / "home")


@pytest.fixture(scope="session")
def train_tiny():
    """Train in-process: AdamW on random ``block_size``-token blocks of ``texts``, then save to ``folder``.

    From scratch (the ``tiny`` preset, with ``tokenizer`` or one trained on ``texts``) or from the
    model folder ``base``. Seeded, so the same call gives the same weights. ``schedule`` gives the
    learning rate the trainer's shape (warm-up over a tenth of the steps, cosine decay): a fixture
    that must forget and remember like a real champion and its warm start needs it; the learning
    rate is constant otherwise.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genloop.training.config import TrainConfig
    from genloop.training.loop import make_schedule
    from genloop.training.models import build_model
    from genloop.training.tokenizer import train_tokenizer

    def train(texts: list[str], steps: int, folder: Path, *, base: Path | None = None, tokenizer=None,
              vocab_size: int = 512, block_size: int = 64, seed: int = 0, lr: float = 3e-3,
              schedule: bool = False) -> Path:
        if base is not None:
            tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
        else:
            tokenizer = tokenizer or train_tokenizer(texts, vocab_size=vocab_size)
            model = build_model("tiny", tokenizer, block_size=block_size, seed=seed)
        ids = torch.tensor(tokenizer(tokenizer.eos_token.join(texts))["input_ids"])
        blocks = ids[: len(ids) // block_size * block_size].view(-1, block_size)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        shape = make_schedule(optimizer, TrainConfig(max_steps=steps, warmup_steps=steps // 10)) if schedule else None
        model.train()
        for _ in range(steps):
            batch = blocks[torch.randint(len(blocks), (8,), generator=generator)]
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            if shape is not None:
                shape.step()
            optimizer.zero_grad()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return train


@pytest.fixture(scope="session")
def make_tiny_model(train_tiny):
    """A tiny GPT-2 (64-token context) with its tokenizer, 20 steps into learning the pydoc topics."""
    import pydoc_data.topics

    from genloop.training.tokenizer import train_tokenizer

    texts = [p for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p) > 80][:400]
    tokenizer = train_tokenizer(texts, vocab_size=512)

    def make(folder: Path, seed: int = 0) -> Path:
        return train_tiny(texts, 20, folder, tokenizer=tokenizer, seed=seed)

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
    from genloop.services.registry import MODEL_ARTIFACT, Registry

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
    import pydoc_data.topics
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from genloop.training.datasets import MANIFEST_FILE, TRAIN_FILE, VALIDATION_FILE

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


@pytest.fixture(scope="session")
def own_ray_processes():
    """Processes of this test session's Ray whose command line contains ``text``: the test's own, not
    those of another Ray on the machine (another test run, a `genloop` subprocess), which a test must
    never kill."""
    import psutil

    def find(text: str) -> list:
        me = os.getpid()
        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if text in " ".join(process.info["cmdline"] or []) and me in {p.pid for p in process.parents()}:
                    found.append(process)
            except psutil.NoSuchProcess:
                continue
        return found

    return find
