"""Training on real Ray Train (2 CPU workers) with real MLflow on SQLite, end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.services.training_run import train
from genloop.training import trainer
from genloop.training.cost import logged_cost
from genloop.training.datasets import ingest
from genloop.training.errors import UserInputError

pytestmark = pytest.mark.slow


def small_training(config: GenloopConfig, max_steps: int = 40, eval_every: int = 10) -> GenloopConfig:
    config.data.max_documents_per_source = 1500
    config.tokenizer.vocab_size = 1024
    config.train.max_steps = max_steps
    config.train.eval_every = eval_every
    config.train.eval_batches = 2
    config.train.micro_batch_size = 8
    config.train.warmup_steps = 5
    config.train.num_workers = 2
    return config


@pytest.fixture(scope="module")
def docs_datasets(tmp_path_factory, ray_cluster) -> Path:
    """Python's docs ingested once (ingestion is test_ingest's subject); each test trains on a copy."""
    folder = tmp_path_factory.mktemp("datasets")
    ingest(["builtin:python-docs"], "docs", small_training(GenloopConfig()).data, folder)
    return folder


@pytest.fixture
def docs_config(genloop_config: GenloopConfig, docs_datasets: Path) -> GenloopConfig:
    config = small_training(genloop_config)
    shutil.copytree(docs_datasets, config.datasets_dir)
    return config


def runs(config: GenloopConfig) -> list:
    registry = Registry(config)
    return registry.client.search_runs([registry.experiment_id()])


def test_train_registers_a_loadable_model_that_learned(docs_config: GenloopConfig):
    run = train(docs_config, "docs", show_progress=False)

    assert run.metrics["best_val_loss"] < run.metrics["initial_val_loss"] - 0.5
    assert run.cost.tokens_seen == 40 * 2 * 8 * 128
    assert run.cost.cost_usd > 0 and run.cost.energy_kwh > 0 and 0 < run.cost.mfu < 1

    registry = Registry(docs_config)
    version = registry.resolve(run.version)
    assert version.tags["dataset"] == "docs:v1"
    assert version.tags["dataset_hash"] and version.tags["config_hash"] and version.tags["git_revision"]
    assert version.tags["parent_version"] == ""
    mlflow_run = registry.client.get_run(run.run_id)
    assert mlflow_run.info.status == "FINISHED"
    history = registry.client.get_metric_history(run.run_id, "train_loss")
    assert len(history) == 40
    assert {"val_loss", "val_perplexity"} <= set(mlflow_run.data.metrics)
    assert logged_cost(mlflow_run.data.metrics).mfu is not None

    path = registry.local_path(version)
    assert (path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer("The for statement", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]).strip()

    # Warm start with LoRA from the registered version: a new version, merged into plain weights.
    docs_config.train.lora.enabled = True
    docs_config.train.max_steps = 10
    child = train(docs_config, "docs", base=run.version, show_progress=False)
    child_version = registry.resolve(child.version)
    assert child_version.tags["parent_version"] == run.version
    child_path = registry.local_path(child_version)
    assert not (child_path / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(child_path)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    pairs = zip(model.state_dict().values(), merged.state_dict().values(), strict=True)
    changed = any(not torch.equal(a, b) for a, b in pairs)
    assert changed


def test_early_stopping_ends_the_run_after_patience_validations(docs_config: GenloopConfig):
    docs_config.train.num_workers = 1  # the rule is the loop's, whatever the number of workers
    docs_config.train.max_steps = 200
    docs_config.train.eval_every = 5
    docs_config.train.patience = 2
    docs_config.train.min_delta = 100.0  # no validation after the first can count as an improvement
    run = train(docs_config, "docs", show_progress=False)
    assert run.metrics["steps"] == 15  # step 5 sets the best; 10 and 15 miss it; patience 2 stops there
    # Patience counts gains under min_delta as none, but the run keeps its best checkpoint all the same.
    losses = {m.step: m.value for m in Registry(docs_config).client.get_metric_history(run.run_id, "val_loss")
              if m.step > 0}
    assert sorted(losses) == [5, 10, 15] and run.metrics["best_step"] == min(losses, key=losses.__getitem__)


def test_killed_worker_resumes_from_checkpoint(docs_config: GenloopConfig, own_ray_processes):
    docs_config.train.max_steps = 30  # checkpointed every 10: killed after the first, resumed for the rest
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run=train(docs_config, "docs", show_progress=False)))
    thread.start()

    # Ray Train's controller writes this snapshot once it has registered a checkpoint: from then
    # on a lost worker group must restart from it, not from scratch.
    storage = Path(docs_config.ray_storage_path)
    deadline = time.time() + 300
    while time.time() < deadline and not list(storage.glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.2)
    assert list(storage.glob("*/checkpoint_manager_snapshot.json")), "no checkpoint was registered"
    workers = own_ray_processes("RayTrainWorker")
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)

    thread.join(timeout=600)
    run = outcome["run"]
    assert run.metrics["restarts"] >= 1
    assert run.metrics["steps"] == 30
    assert run.metrics["best_val_loss"] < run.metrics["initial_val_loss"]


def test_bad_training_input_is_a_user_error_and_leaves_nothing(tmp_path: Path, ray_cluster):
    from typer.testing import CliRunner

    from genloop.services.cli import app

    home = tmp_path / "home"
    env = {"GENLOOP_HOME": str(home), "GENLOOP_DATA__MAX_DOCUMENTS_PER_SOURCE": "300"}
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("A short but valid paragraph of text that passes the minimum length filter easily.\n")
    assert CliRunner().invoke(app, ["data", "ingest", str(tiny), "--name", "tiny"], env=env).exit_code == 0

    cases = {
        ("train", "--dataset", "tiny:v9"): "v9",
        ("train", "--dataset", "tiny", "--preset", "huge"): "unknown preset",
        ("train", "--dataset", "tiny", "--lora"): "--base",
        ("train", "--dataset", "tiny", "--preset", "tiny", "--base", "1"): "conflict",
        ("train", "--dataset", "tiny", "--base", "7"): "unknown model version",
        ("train", "--dataset", "tiny"): "fewer than one step",
    }
    for args, message in cases.items():  # in-process; `genloop` turns these errors into exit 2 (below)
        result = CliRunner().invoke(app, list(args), env=env)
        assert isinstance(result.exception, UserInputError), (args, result.output, result.exception)
        assert message in str(result.exception), (args, str(result.exception))

    process = subprocess.run([sys.executable, "-m", "genloop.services.cli", "train", "--dataset", "missing"],
                             capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert process.returncode == 2 and "missing" in process.stderr and "Traceback" not in process.stderr

    config = GenloopConfig(home=home)
    assert all(r.info.status != "RUNNING" for r in runs(config))
    assert Registry(config).versions() == []


def test_unloadable_base_is_a_user_error(docs_config: GenloopConfig, tmp_path: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserInputError, match="cannot load model"):
        train(docs_config, "docs", base=str(broken), show_progress=False)
    assert Registry(docs_config).versions() == []
    assert MlflowClient(docs_config.mlflow_tracking_uri).search_experiments()  # store usable


def test_training_that_would_starve_ray_data_is_refused(docs_config: GenloopConfig, ray_cluster, monkeypatch):
    """A Serve replica (here: any actor) holding a CPU leaves the workers and Ray Data too little: a
    clear error before anything is registered, not a run that hangs waiting for a CPU."""
    monkeypatch.setattr(trainer, "CPU_SETTLE_S", 1.0)  # the holder is up: no need to wait out a lag
    holder = ray_cluster.remote(num_cpus=1)(type("CpuHolder", (), {"ping": lambda self: True})).remote()
    ray_cluster.get(holder.ping.remote())
    try:
        with pytest.raises(UserInputError, match="free CPUs for Ray Data"):
            train(docs_config, "docs")
    finally:
        ray_cluster.kill(holder)
    assert Registry(docs_config).versions() == []
