"""Shared fixtures: one small local Ray per test process, trained models shared by the whole session
(and cached on disk across sessions), an isolated GENLOOP_HOME per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from model_cache import ModelCache

# Where trained test models are kept between sessions: a fresh clone (CI) trains each once.
_CACHE_DIR = Path(os.environ.get("GENLOOP_TEST_CACHE") or Path(__file__).parents[1] / ".test-cache")
# Environment overrides beat explicit config values: a GENLOOP_HOME set in the shell that runs the
# tests would send every test's state to one place.
for _name in [n for n in os.environ if n.startswith("GENLOOP_")]:
    del os.environ[_name]
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: each run's end, and each verdict a search's
# trial waits for, costs up to that. The suite's runs are seconds long; Ray reads it when it starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a test marked ``slow`` first, in collection order otherwise: xdist hands out whole
    files in this order (``make test`` turns off its reordering by test count), so the longest start
    at once, one per worker, and the short files fill in around them instead of trailing behind."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread per test process: the models here are tiny and gain nothing from two, the
    two xdist workers (and the Ray workers beside them) already fill both cores, and OpenMP threads
    spinning against each other on a busy machine made small ops several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with the machine's two CPUs, shared by every test of this process that needs
    it; Serve runs on the data plane ``genloop serve`` uses. Started with what tests need and no
    more: no dashboard (its agent and web server cost seconds and a core's share), a small object
    store, and no workers started ahead of the first task (each xdist worker has a Ray of its own,
    and two Rays pre-starting a worker per CPU on a 2-core machine only compete)."""
    import ray
    import ray.data

    from genloop.services.cluster import own_state_api, use_serve_env

    if not ray.is_initialized():
        use_serve_env()
        own_state_api()  # no dashboard: the state API's calls fail at once instead of finding a stale cluster
        ray.init(address="local", num_cpus=2, log_to_driver=True,  # never a stale `ray start` cluster
                 include_dashboard=False, object_store_memory=256 * 1024**2,
                 _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def genloop_config(tmp_path: Path):
    """A config whose whole state (datasets, MLflow SQLite, Ray storage) lives in ``tmp_path``."""
    from genloop.services.config import GenloopConfig

    return GenloopConfig(home=tmp_path / "home")


def _train(texts: list[str], steps: int, folder: Path, base: Path | None, tokenizer, vocab_size: int,
           block_size: int, seed: int, lr: float, schedule: bool) -> None:
    """AdamW on random ``block_size``-token blocks of ``texts``, batches of 8, seeded; saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genloop.training.config import TrainConfig
    from genloop.training.loop import make_schedule
    from genloop.training.models import build_model
    from genloop.training.tokenizer import train_tokenizer

    torch.manual_seed(seed)
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


@pytest.fixture(scope="session")
def train_tiny():
    """A tiny GPT-2 trained in-process on ``texts``, from scratch (the ``tiny`` preset, with
    ``tokenizer`` or one trained on ``texts``) or from the model folder ``base``; returns its folder.

    Trained once: the folder is shared by every test that asks for the same model, in this session
    and later ones (``model_cache``), and must not be written to. ``schedule`` gives the learning
    rate the trainer's shape (warm-up over a tenth of the steps, cosine decay): a fixture that must
    forget and remember like a real champion and its warm start needs it; the rate is constant otherwise.
    """
    from model_cache import code_fingerprint, texts_fingerprint

    cache, code = ModelCache(_CACHE_DIR / "models"), code_fingerprint(_train)

    def train(texts: list[str], steps: int, *, base: Path | None = None, tokenizer=None, vocab_size: int = 512,
              block_size: int = 64, seed: int = 0, lr: float = 3e-3, schedule: bool = False) -> Path:
        key = {"code": code, "texts": texts_fingerprint(texts), "steps": steps, "base": base.name if base else None,
               "tokenizer": texts_fingerprint([tokenizer.backend_tokenizer.to_str()]) if tokenizer else None,
               "vocab_size": vocab_size, "block_size": block_size, "seed": seed, "lr": lr, "schedule": schedule}
        return cache.get(key, lambda folder: _train(texts, steps, folder, base, tokenizer, vocab_size, block_size,
                                                    seed, lr, schedule))

    return train


@pytest.fixture(scope="session")
def make_tiny_model(train_tiny):
    """A tiny GPT-2 (64-token context) with its tokenizer, 20 steps into learning the pydoc topics; one
    folder per seed, shared read-only."""
    import pydoc_data.topics

    from genloop.training.tokenizer import train_tokenizer

    texts = [p for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p) > 80][:400]
    tokenizer = train_tokenizer(texts, vocab_size=512)

    def make(seed: int = 0) -> Path:
        return train_tiny(texts, 20, tokenizer=tokenizer, seed=seed)

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

    from genloop.training.dataset_store import MANIFEST_FILE, TRAIN_FILE, VALIDATION_FILE

    def make(config) -> list[str]:
        docs = [p for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p.split()) >= 8]
        random.Random(0).shuffle(docs)
        folder = Path(config.datasets_dir) / "docs" / "v1"
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
