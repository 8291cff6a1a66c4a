"""One training run end to end: dataset → initial model → Ray Train → MLflow run → registry version.

The run either registers a new model version or leaves nothing behind but a FAILED MLflow run:
options and data are checked before anything starts, and registration is the last step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray.data
import torch
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig, config_hash
from genloop.services.leftovers import close_orphaned_runs, owner_tags, sweep_work_dirs, work_dir_prefix
from genloop.services.registry import MODEL_ARTIFACT, Registry
from genloop.services.selection import GateScore, Selection, bits_per_nat
from genloop.training.cleaning import SELECTION
from genloop.training.config import TrainConfig
from genloop.training.cost import COST_USD_TAG, CostReport, cost_report, logged_cost
from genloop.training.dataset_store import DatasetVersion, resolve_dataset
from genloop.training.errors import UserInputError
from genloop.training.models import build_model, context_length, load_model, parameter_count
from genloop.training.storage import filesystem
from genloop.training.tokenizer import train_tokenizer
from genloop.training.trainer import export_checkpoint, fit, validation_blocks

logger = logging.getLogger(__name__)

TOKENIZER_SAMPLE_DOCS = 200_000  # enough text for a BPE vocabulary; bounds driver memory


@dataclass(frozen=True)
class TrainingRun:
    run_id: str
    version: str
    metrics: dict
    cost: CostReport
    selection: str = ""  # why the kept checkpoint was chosen, with a retrain's selection
    dataset: str = ""  # what it trained on, as name:vN
    trials: tuple[dict, ...] = ()  # a searched retrain's trials (``services.search``), as its trials.json holds them


def _texts(path: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` texts of a split (a folder or URI), read in batches: no more of it than needed."""
    texts: list[str] = []
    fs, inner = filesystem(path)
    for batch in pq.ParquetFile(fs.open_input_file(inner)).iter_batches(columns=["text"], batch_size=4096):
        texts.extend(batch.column("text").to_pylist())
        if limit and len(texts) >= limit:
            return texts[:limit]
    return texts


def _token_count(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> int:
    if not texts:  # tokenizers fail on an empty batch
        return 0
    return sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flatten(prefix: str, value: object) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else key, inner))
        return out
    return {prefix: str(value)}


def check_size(tokenizer: PreTrainedTokenizerBase, dataset: DatasetVersion, settings: TrainConfig,
                val_blocks: torch.Tensor) -> int:
    """Refuse data too small to fill one step per worker, or one validation block per worker."""
    train_tokens = _token_count(tokenizer, _texts(dataset.train_path, TOKENIZER_SAMPLE_DOCS))
    needed = settings.block_size * settings.micro_batch_size * settings.grad_accum_steps * settings.num_workers
    if train_tokens < needed:
        raise UserInputError(
            f"dataset {dataset.name}:v{dataset.version} has {train_tokens} train tokens, fewer than one step needs "
            f"({settings.num_workers} workers × {settings.micro_batch_size} × {settings.grad_accum_steps} blocks of "
            f"{settings.block_size} tokens = {needed}); add data or lower train.block_size/micro_batch_size"
        )
    if len(val_blocks) < settings.num_workers:
        raise UserInputError(
            f"dataset {dataset.name}:v{dataset.version} holds {len(val_blocks)} blocks of {settings.block_size} "
            f"tokens in the selection part of its validation split (a third, by content hash), fewer than one per "
            f"worker ({settings.num_workers}); add data or lower train.block_size"
        )
    return train_tokens


def initial_compute(registry: Registry, version: ModelVersion) -> tuple[int, float] | None:
    """Tokens and FLOPs of the from-scratch run that ``version``'s lineage started with; None when
    that run logged no cost (a model registered from outside genloop)."""
    root = registry.lineage(version)[-1]
    cost = logged_cost(registry.client.get_run(root.run_id).data.metrics if root.run_id else {})
    if cost.tokens_seen is None or cost.parameters is None:
        return None
    return cost.tokens_seen, 6.0 * cost.parameters * cost.tokens_seen


@dataclass
class Prepared:
    """What every run (and every trial of a search) starts from, made before any MLflow run exists:
    the initial model folder, the validation blocks, the checkpoint score, the run's tags."""

    dataset: DatasetVersion
    base: str | None
    settings: TrainConfig
    work: Path
    init_dir: Path
    tokenizer: PreTrainedTokenizerBase
    val_blocks: dict[str, torch.Tensor]
    score: GateScore | None
    parameters: int
    tags: dict[str, str]
    initial: tuple[int, float] | None

    @property
    def log_params(self) -> list[Param]:
        params = _flatten("train", self.settings.model_dump(mode="json"))
        params.update(dataset=self.tags["dataset"], base=self.base or "", parameters=str(self.parameters),
                      vocab_size=str(len(self.tokenizer)))
        return [Param(k, v[:6000]) for k, v in params.items()]


def prepare(config: GenloopConfig, dataset_spec: str, base: str | None, settings: TrainConfig,
            selection: Selection | None, registry: Registry,
            tokenizer: PreTrainedTokenizerBase | None = None) -> Prepared:
    """Check the options and the data and build the initial model; the caller removes ``work``.
    From scratch, ``tokenizer`` (one ``prepare`` trained on the same data, for another preset) saves
    training it again."""
    if settings.lora.enabled and base is None:
        raise UserInputError("--lora fine-tunes an existing model: give --base PATH|VERSION")
    dataset = resolve_dataset(config.datasets_dir, dataset_spec)
    parent_version = ""
    initial: tuple[int, float] | None = None
    close_orphaned_runs(registry.client, registry.experiment_id())
    sweep_work_dirs(config.home)
    work = Path(tempfile.mkdtemp(prefix=work_dir_prefix(), dir=config.home))
    init_dir = work / "init"
    try:
        if base is None:
            tokenizer = tokenizer or train_tokenizer(_texts(dataset.train_path, TOKENIZER_SAMPLE_DOCS),
                                        config.tokenizer.vocab_size, config.tokenizer.min_frequency)
            model = build_model(settings.preset, tokenizer, settings.block_size, settings.seed)
        else:
            if Path(base).exists():
                base_dir = Path(base)
            else:
                base_version = registry.resolve(base)
                parent_version = base_version.version
                initial = initial_compute(registry, base_version)
                base_dir = registry.local_path(base_version)
            model = load_model(base_dir)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            if settings.block_size > context_length(model.config):
                raise UserInputError(f"block_size {settings.block_size} exceeds the base model's context "
                                     f"of {context_length(model.config)} tokens")
        model.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
        val_blocks = {"current": validation_blocks(dataset.held_out(SELECTION), tokenizer, settings)}
        check_size(tokenizer, dataset, settings, val_blocks["current"])
        score = None
        if selection is not None:
            for name, texts in selection.sets.items():
                val_blocks[name] = validation_blocks(texts, tokenizer, settings)
                if not len(val_blocks[name]):
                    raise UserInputError(f"the {name} set's held-out texts fill no block of {settings.block_size} "
                                         "tokens: the retrain cannot ask the gate's question on it")
            score = GateScore(selection.policy, selection.weights,
                              {name: bits_per_nat(blocks, tokenizer) for name, blocks in val_blocks.items()},
                              selection.margin)
        parameters = parameter_count(model)
        del model
        tags = {
            "dataset": f"{dataset.name}:v{dataset.version}",
            "dataset_hash": dataset.manifest["content_hash"],
            "parent_version": parent_version,
            "config_hash": config_hash(settings),
            "git_revision": _git_revision(),
            "preset": settings.preset if base is None else f"base:{base}",
        }
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Prepared(dataset=dataset, base=base, settings=settings, work=work, init_dir=init_dir, tokenizer=tokenizer,
                    val_blocks=val_blocks, score=score, parameters=parameters, tags=tags, initial=initial)


def register(registry: Registry, prepared: Prepared, run_id: str, checkpoint: str,
             metrics: dict, cost: CostReport) -> TrainingRun:
    """Log the summary and the cost of the run ``run_id``, its ``checkpoint`` as the model, and
    register it: the last step, so that a run that fails before leaves no version behind."""
    client = registry.client
    export_dir = export_checkpoint(checkpoint, prepared.init_dir, prepared.settings, prepared.work / MODEL_ARTIFACT)
    summary = {
        "best_val_loss": metrics["best_val_loss"],
        "best_val_perplexity": math.exp(metrics["best_val_loss"]),
        "initial_val_loss": metrics["initial_val_loss"],
        "best_step": metrics["best_step"],
        "steps": metrics["step"],
        "restarts": metrics["restarts"],
    }
    if prepared.score is not None:
        summary["best_gate_score"] = metrics["best_score"]
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in summary.items()]
                     + [Metric(k, v, 0, 0) for k, v in cost.mlflow_metrics().items()])
    client.log_dict(run_id, cost.model_dump(), "cost_report.json")
    client.log_artifacts(run_id, str(export_dir), MODEL_ARTIFACT)
    tags = prepared.tags
    version = registry.register(run_id, tags={**tags, "run_id": run_id, COST_USD_TAG: f"{cost.cost_usd:.6f}"})
    client.set_terminated(run_id, "FINISHED")
    logger.info("registered %s v%s (%s)", registry.name, version.version, json.dumps(summary))
    return TrainingRun(run_id=run_id, version=str(version.version), metrics=summary, cost=cost,
                       selection=client.get_run(run_id).data.tags.get("selection", ""), dataset=tags["dataset"])


def open_run(registry: Registry, prepared: Prepared, run_name: str, tags: dict[str, str] | None = None,
             params: dict[str, str] | None = None) -> str:
    """The MLflow run of ``prepared``, with its parameters and data manifest; removes ``prepared.work``
    when the run cannot be made (nothing else would)."""
    client = registry.client
    try:
        run_id = client.create_run(registry.experiment_id(), run_name=run_name,
                                   tags={**prepared.tags, **owner_tags(), **(tags or {})}).info.run_id
    except BaseException:
        shutil.rmtree(prepared.work, ignore_errors=True)
        raise
    try:
        client.log_batch(run_id, params=prepared.log_params + [Param(k, v) for k, v in (params or {}).items()])
        client.log_dict(run_id, prepared.dataset.manifest, "data/manifest.json")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        shutil.rmtree(prepared.work, ignore_errors=True)
        raise
    return run_id


def train(
    config: GenloopConfig, dataset_spec: str, base: str | None = None, show_progress: bool = True,
    settings: TrainConfig | None = None, on_run: Callable[[str], None] | None = None,
    selection: Selection | None = None,
) -> TrainingRun:
    """Train a model on ``dataset_spec`` (from scratch, or from ``base``) and register it.

    ``settings`` replaces ``config.train`` (a retrain's budgeted, gentler schedule); ``on_run`` gets
    the MLflow run's id as soon as it exists, before the long part. Every evaluation scores the
    selection part of the dataset's validation split; with ``selection`` (a retrain's) it scores
    that selection's sets too and keeps the checkpoint the gate's question ranks first."""
    registry = Registry(config)
    prepared = prepare(config, dataset_spec, base, settings or config.train, selection, registry)
    dataset, client = prepared.dataset, registry.client
    run_name = f"train-{dataset.name}-v{dataset.version}"
    run_id = open_run(registry, prepared, run_name)
    try:
        if on_run is not None:
            on_run(run_id)
        connect(config.ray)
        outcome = fit(
            train_dataset=ray.data.read_parquet(dataset.train_path),
            validation_blocks=prepared.val_blocks,
            score=prepared.score,
            init_model_dir=prepared.init_dir,
            settings=prepared.settings,
            storage_path=config.ray_storage_path,
            run_name=f"{run_name}-{run_id[:8]}",
            tracking_uri=registry.tracking_uri,
            run_id=run_id,
            show_progress=show_progress,
        )
        cost = cost_report(
            wall_seconds=outcome.wall_seconds,
            train_seconds=outcome.metrics["train_seconds"],
            device_type=outcome.device_type,
            device_count=outcome.num_devices,
            parameters=prepared.parameters,
            tokens_seen=int(outcome.metrics["tokens_seen"]),
            timed_tokens=int(outcome.metrics["timed_tokens"]),
            prices=config.cost,
            initial_compute_flops=prepared.initial[1] if prepared.initial else None,
        )
        return register(registry, prepared, run_id, outcome.best_checkpoint, outcome.metrics, cost)
    except BaseException:
        if client.get_run(run_id).info.status == "RUNNING":  # a stopping service may have closed it as KILLED
            client.set_terminated(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(prepared.work, ignore_errors=True)
