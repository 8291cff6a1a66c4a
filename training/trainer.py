"""Driver side of a training run: launch the Ray Train ``TorchTrainer``, show progress, export.

The driver prepares one initial model folder (fresh preset or warm-start base, plus tokenizer) so
that every worker, and every restarted worker, starts from identical weights. Ray Train keeps
the best checkpoint (lowest validation loss, or a retrain's gate score) and the latest one (for
resuming after a failure); the best is exported as a plain Hugging Face folder with safetensors
weights.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from genloop.training.config import TrainConfig
from genloop.training.errors import UserInputError
from genloop.training.loop import STATE_FILE, TEXT_BATCH_ROWS, packed_batches, train_worker
from genloop.training.models import merge_lora, pack_folder, with_lora

CPU_SETTLE_S = 10.0  # how long a shortage of free CPUs must last before a run is refused

logger = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """Ray Train gave up (retries exhausted or a worker error); the message says why."""


@dataclass(frozen=True)
class TrainOutcome:
    best_checkpoint: str  # a URI on the run's storage (see ``checkpoint_uri``)
    metrics: dict[str, Any]
    wall_seconds: float
    device_type: str
    num_devices: int


def fit(
    *,
    train_dataset: ray.data.Dataset,
    validation_blocks: dict[str, torch.Tensor],
    init_model_dir: Path,
    settings: TrainConfig,
    storage_path: str,
    run_name: str,
    tracking_uri: str,
    run_id: str,
    show_progress: bool = True,
    score: Callable[[dict[str, float], dict[str, float]], tuple[float, str]] | None = None,
) -> TrainOutcome:
    """Train on Ray Train and return the best checkpoint; raises ``TrainingFailed``.

    ``validation_blocks`` holds the sets every evaluation scores, "current" (the run's own data)
    first. The best checkpoint is the one ``score`` (of the sets' losses and the initial model's,
    higher is better; it travels to the workers by pickle) ranks first, or without one the lowest
    loss on "current"."""
    _check_free_cpus(settings)
    progress_queue = ray.util.queue.Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    trainer = _trainer(train_dataset=train_dataset, validation_blocks=validation_blocks, init_model_dir=init_model_dir,
                       settings=settings, storage_path=storage_path, run_name=run_name, tracking_uri=tracking_uri,
                       run_id=run_id, score=score, progress_queue=progress_queue)
    started = time.perf_counter()
    result_box: dict[str, Any] = {}

    def run() -> None:
        try:
            result_box["result"] = trainer.fit()
        except Exception as exc:  # noqa: BLE001 — surfaced on the caller's thread below
            result_box["error"] = exc

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    _follow(thread, progress_queue, settings.max_steps, show_progress)
    thread.join()
    wall = time.perf_counter() - started
    with contextlib.suppress(Exception):  # the queue actor may already be gone with a lost cluster
        ray.kill(progress_queue.actor)
    if "error" in result_box:
        raise TrainingFailed(f"training failed: {result_box['error']}") from result_box["error"]
    result = result_box["result"]
    if result.error:
        raise TrainingFailed(f"training failed: {result.error}") from result.error
    best = result.get_best_checkpoint(metric="score", mode="max")
    if best is None:
        raise TrainingFailed("training reported no checkpoint")
    return TrainOutcome(
        best_checkpoint=checkpoint_uri(storage_path, best.path),
        metrics=dict(result.metrics),
        wall_seconds=wall,
        device_type="cuda" if settings.use_gpu else "cpu",
        num_devices=settings.num_workers,
    )


def _check_free_cpus(settings: TrainConfig) -> None:
    """Refuse a CPU run whose workers would leave Ray Data no CPU to stream their shards (a hang)."""
    reserved = settings.num_workers * settings.cpus_per_worker
    free = ray.available_resources().get("CPU", 0)  # not the total: serving replicas may hold some
    # Ray's view of free resources lags the tasks that just ended (the ingest before a retrain, the
    # Serve start beside a bootstrap): a shortage must last a few seconds to be one.
    deadline = time.monotonic() + CPU_SETTLE_S
    while not settings.use_gpu and free - reserved < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        free = ray.available_resources().get("CPU", 0)
    if not settings.use_gpu and free - reserved < 1:
        # With every CPU reserved by the workers, Ray Data cannot run the reads that feed them: a hang.
        raise UserInputError(
            f"{settings.num_workers} workers × {settings.cpus_per_worker} CPUs leave {free - reserved:g} of the "
            f"cluster's {free:g} free CPUs for Ray Data; lower train.num_workers or train.cpus_per_worker"
        )


def _trainer(*, train_dataset: ray.data.Dataset, validation_blocks: dict[str, torch.Tensor], init_model_dir: Path,
             settings: TrainConfig, storage_path: str, run_name: str, tracking_uri: str, run_id: str,
             score: Callable[[dict[str, float], dict[str, float]], tuple[float, str]] | None,
             progress_queue: Any = None, callbacks: list | None = None, verdicts: Any = None,
             trial_id: str = "") -> TorchTrainer:
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "train": settings.model_dump(mode="json"),
            "init_model": ray.put(pack_folder(init_model_dir)),  # by value: workers may run on other nodes
            "validation_blocks": ray.put(validation_blocks),
            "score": score,
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "progress_queue": progress_queue,
            "verdicts": verdicts,
            "trial_id": trial_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            placement_strategy=settings.placement_strategy,
            resources_per_worker={"GPU": 1, "CPU": settings.cpus_per_worker}
            if settings.use_gpu
            else {"CPU": settings.cpus_per_worker},
        ),
        datasets={"train": train_dataset},
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="max"
            ),
            callbacks=callbacks,
        ),
    )


def fit_trial(*, train_dataset: ray.data.Dataset, validation_blocks: dict[str, torch.Tensor], init_model_dir: Path,
              settings: TrainConfig, storage_path: str, run_name: str, tracking_uri: str, run_id: str,
              score: Callable[[dict[str, float], dict[str, float]], tuple[float, str]] | None,
              verdicts: Any, trial_id: str) -> None:
    """``fit`` as one trial of a Ray Tune search (``services.trials``): the same Ray Train run, its
    reports (and checkpoint paths) handed to Tune by Ray's ``TuneReportCallback``, so that Tune's
    scheduler can decide after every evaluation whether it goes on. The workers wait for that verdict
    (``verdicts.wait``, an actor of ``services.trials``) and end the run cleanly on a stop."""
    from ray.tune.integration.ray_train import TuneReportCallback

    _check_free_cpus(settings)
    trainer = _trainer(train_dataset=train_dataset, validation_blocks=validation_blocks, init_model_dir=init_model_dir,
                       settings=settings, storage_path=storage_path, run_name=run_name, tracking_uri=tracking_uri,
                       run_id=run_id, score=score, callbacks=[TuneReportCallback()], verdicts=verdicts,
                       trial_id=trial_id)
    result = trainer.fit()
    if result.error:
        raise TrainingFailed(f"training failed: {result.error}") from result.error


def validation_blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, settings: TrainConfig) -> torch.Tensor:
    """A validation set every evaluation of a run scores: the first blocks of ``texts``.

    Packed once by the driver and shipped to the workers through Ray's object store: a Ray Data
    shard per worker cost ~10 s of streaming start-up per run for a few dozen blocks, and one fixed
    tensor makes every evaluation score exactly the same tokens."""
    wanted = settings.eval_batches * settings.micro_batch_size * settings.num_workers
    chunks = (texts[start:start + TEXT_BATCH_ROWS] for start in range(0, len(texts), TEXT_BATCH_ROWS))
    blocks: list[torch.Tensor] = []
    for batch in packed_batches(chunks, tokenizer, settings.block_size, 1):
        blocks.append(batch[0])
        if len(blocks) == wanted:
            break
    return torch.stack(blocks) if blocks else torch.empty(0, settings.block_size, dtype=torch.long)


def _follow(thread: threading.Thread, queue: Any, max_steps: int, show: bool) -> None:
    """Drain rank 0's progress messages into a rich progress bar until training ends."""
    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    with Progress(*columns, disable=not show, transient=False) as bar:
        task = bar.add_task("train", total=max_steps, status="starting workers…")
        fields: dict[str, float] = {}
        while thread.is_alive() or not queue.empty():
            try:
                message = queue.get(timeout=0.5)
            except Exception:  # noqa: BLE001 — queue.Empty, or the queue actor gone after the run
                if not thread.is_alive():
                    break
                continue
            fields.update(message)
            status = "  ".join(
                f"{label} {fields[key]:{fmt}}"
                for key, label, fmt in (("train_loss", "loss", ".3f"), ("val_loss", "val", ".3f"),
                                        ("tokens_per_second", "tok/s", ",.0f"))
                if key in fields
            )
            bar.update(task, completed=message["step"], status=status)


def checkpoint_uri(storage_path: str, path: str) -> str:
    """Where a checkpoint is, as a URI any node can open. Ray reports a checkpoint's path within its
    storage's filesystem (``bucket/key`` for ``s3://``), which names nothing without that filesystem."""
    scheme = urlparse(storage_path).scheme
    return f"{scheme}://{path}" if scheme not in ("", "file") else path


def export_checkpoint(checkpoint: str, init_model_dir: Path, settings: TrainConfig, out_dir: Path) -> Path:
    """Write the checkpoint (a URI from ``checkpoint_uri``) as a Hugging Face folder (LoRA merged) with
    the tokenizer; a checkpoint in object storage is downloaded for the while."""
    model = AutoModelForCausalLM.from_pretrained(init_model_dir)
    if settings.lora.enabled:
        model = with_lora(model, settings.lora)
    with ray.train.Checkpoint(checkpoint).as_directory() as directory:
        saved = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    model = merge_lora(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(init_model_dir).save_pretrained(out_dir)
    return out_dir
