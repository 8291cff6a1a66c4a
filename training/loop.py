"""The training loop that runs inside each Ray Train worker, and the pieces it is made of.

Every worker streams its shard of the train split, tokenizes and packs it into ``block_size``
sequences, and takes synchronised optimizer steps (DDP). Decisions that end a loop (epoch end,
early stopping, max steps) are taken from all-reduced values, so every worker calls
``ray.train.report`` the same number of times, as Ray Train requires. The pieces (packing,
optimizer, schedule, evaluation) are plain functions so that the benchmark's bare PyTorch loop
runs exactly the same work without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from genloop.training.config import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
TEXT_BATCH_ROWS = 64  # documents per Ray Data batch handed to the tokenizer


def packed_batches(
    text_batches: Iterable[list[str]], tokenizer: Any, block_size: int, micro_batch_size: int
) -> Iterator[torch.Tensor]:
    """Concatenate documents (each closed by end-of-text) and cut them into full blocks.

    Packing wastes no compute on padding; a document may span two blocks, which is the usual
    trade-off for causal LM pre-training (GPT-2, torchtitan).
    """
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    blocks: list[list[int]] = []
    for texts in text_batches:
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
        while len(buffer) >= block_size:
            blocks.append(buffer[:block_size])
            del buffer[:block_size]
            if len(blocks) == micro_batch_size:
                yield torch.tensor(blocks, dtype=torch.long)
                blocks = []


def make_optimizer(model: torch.nn.Module, settings: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: decaying biases and norm gains hurts small models."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
        betas=(0.9, 0.95),
    )


def make_schedule(optimizer: torch.optim.Optimizer, settings: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10 % of the peak at ``max_steps``."""
    warmup, total = settings.warmup_steps, settings.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (tensor cores); full precision on CPU, where bf16 is slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_step(
    model: torch.nn.Module,
    micro_batches: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    settings: TrainConfig,
    device: torch.device,
) -> float:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns the mean loss.

    Under DDP the gradient all-reduce runs only on the last micro-batch (``no_sync`` before).
    """
    total = 0.0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        last = i == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast(device):
            loss = model(input_ids=batch, labels=batch).loss / len(micro_batches)
        with sync:
            loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, micro_batch_size: int, device: torch.device) -> float:
    """Mean token loss over ``blocks`` (all-reduced across workers when distributed)."""
    model.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(blocks), micro_batch_size):
        batch = blocks[start : start + micro_batch_size].to(device)
        with autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss_sum[0] += loss.item() * len(batch)
        loss_sum[1] += len(batch)
    model.train()
    _all_reduce(loss_sum, dist.ReduceOp.SUM)
    return float(loss_sum[0] / loss_sum[1])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def _all_have_batch(have: bool) -> bool:
    """True while every worker still has a batch: one worker's epoch end ends it for all."""
    return bool(_all_reduce(torch.tensor([int(have)]), dist.ReduceOp.MIN).item())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is built by ``training.trainer.fit``."""
    import ray
    import ray.data
    import ray.train
    import ray.train.torch
    import ray.util
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    from genloop.training.models import load_model, unpacked, with_lora

    settings = TrainConfig.model_validate(config["train"])
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = data_context.print_on_execution_start = False
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # match intra-op threads to the CPUs Ray reserved for this worker
        torch.set_num_threads(max(1, round(settings.cpus_per_worker)))
    torch.manual_seed(settings.seed + rank)

    with unpacked(ray.get(config["init_model"])) as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load_model(folder)
    if settings.lora.enabled:
        model = with_lora(model, settings.lora)

    # best_score: the checkpoint score (see ``validate``); best_val: the run's own validation loss there.
    state: dict[str, Any] = {"step": 0, "epoch": 0, "best_score": -math.inf, "best_val": math.inf, "best_step": 0,
                             "bad_evals": 0, "tokens": 0, "timed_tokens": 0, "train_seconds": 0.0,
                             "initial_losses": None, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    saved = None
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        state.update(saved["progress"])
        state["restarts"] += 1
        logger.warning("rank %d resuming from the step-%d checkpoint (restart %d)", rank, state["step"],
                       state["restarts"])

    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, settings)
    schedule = make_schedule(optimizer, settings)
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])

    # The fixed validation sets the driver packed (see ``validation_blocks``), "current" (the run's
    # own data) first: each worker takes every world-th block, so the workers together evaluate all
    # of each set at every evaluation.
    val_sets = {name: blocks[rank::world] for name, blocks in ray.get(config["validation_blocks"]).items()}
    score_checkpoint = config.get("score")
    verdicts = config.get("verdicts")  # see ``services.trials``

    mlflow = MlflowClient(config["tracking_uri"]) if rank == 0 else None
    # Where the workers run (node id and address per rank), for an operator asking where a run went.
    nodes: list[Any] = [f"{ray.get_runtime_context().get_node_id()[:12]}@{ray.util.get_node_ip_address()}"] * world
    if world > 1:
        torch.distributed.all_gather_object(nodes, nodes[0])
    if mlflow is not None:  # a restarted group tags where it went beside the first placement
        where = f"worker_nodes_restart_{state['restarts']}" if state["restarts"] else "worker_nodes"
        mlflow.set_tag(config["run_id"], where, " ".join(nodes))
    progress = config.get("progress_queue")

    def log(metrics: dict[str, float], step: int) -> None:
        if mlflow is None:
            return
        now = int(time.time() * 1000)
        mlflow.log_batch(config["run_id"], metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        if progress is not None:
            # A full or gone progress queue must never stop training.
            with contextlib.suppress(Exception):
                progress.put_nowait({"step": step, **metrics})

    def validate() -> tuple[dict[str, float], float, str]:
        """The loss on each validation set, and the checkpoint's score (higher is better) with why:
        ``config["score"]`` (a callable of the losses and the initial model's) where the driver gave
        one, the gate's question for a retrain (``services.selection``); else minus the run's own
        validation loss."""
        losses = {name: evaluate(model, blocks, settings.micro_batch_size, device) for name, blocks in val_sets.items()}
        if score_checkpoint is None or state["initial_losses"] is None:
            return losses, -losses["current"], ""
        score, why = score_checkpoint(losses, state["initial_losses"])
        return losses, score, why

    def log_validation(losses: dict[str, float], score: float, step: int) -> None:
        log({"val_loss": losses["current"], "val_perplexity": math.exp(losses["current"]),
             **{f"val_loss_{name}": loss for name, loss in losses.items() if name != "current"},
             **({"gate_score": score} if score_checkpoint is not None else {})}, step)

    def report(val_loss: float, score: float) -> None:
        """Checkpoint after each validation; the loop always ends on one, so the last report is final."""
        metrics = {"step": state["step"], "val_loss": val_loss, "score": score, "best_score": state["best_score"],
                   "best_val_loss": state["best_val"],
                   "best_step": state["best_step"], "initial_val_loss": state["initial_losses"]["current"],
                   "tokens_seen": state["tokens"], "timed_tokens": state["timed_tokens"],
                   "train_seconds": state["train_seconds"],
                   "restarts": state["restarts"]}
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "progress": dict(state)},
                           Path(directory) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)

    if state["initial_losses"] is None:
        losses, score, _ = validate()
        state["initial_losses"] = losses
        if score_checkpoint is not None:  # the base model against itself: where the curve starts
            score = score_checkpoint(losses, losses)[0]
        log_validation(losses, score, 0)

    # The first step after a (re)start waits for Ray Data to start streaming; it is excluded from
    # train_seconds (and its tokens from timed_tokens) so tokens/s and MFU describe steady training.
    first_step = True
    train_shard = ray.train.get_dataset_shard("train")
    stop = state["step"] >= settings.max_steps or state["bad_evals"] >= settings.patience
    while not stop:
        rows = iter(train_shard.iter_batches(
            batch_size=TEXT_BATCH_ROWS, batch_format="numpy",
            local_shuffle_buffer_size=4 * TEXT_BATCH_ROWS, local_shuffle_seed=settings.seed + state["epoch"]))
        batches = packed_batches((b["text"] for b in rows), tokenizer, settings.block_size, settings.micro_batch_size)
        stepped_this_epoch = False
        while not stop:
            started = time.perf_counter()
            micro = [b for _, b in zip(range(settings.grad_accum_steps), batches, strict=False)]
            if not _all_have_batch(len(micro) == settings.grad_accum_steps):
                break
            loss = train_step(model, micro, optimizer, schedule, settings, device)
            step_tokens = sum(b.numel() for b in micro) * world
            state["tokens"] += step_tokens
            if not first_step:
                state["train_seconds"] += time.perf_counter() - started
                state["timed_tokens"] += step_tokens
            first_step = False
            state["step"] += 1
            stepped_this_epoch = True
            log({"train_loss": loss, "learning_rate": schedule.get_last_lr()[0],
                 "tokens_per_second": state["timed_tokens"] / max(state["train_seconds"], 1e-9)}, state["step"])
            if state["step"] % settings.eval_every == 0 or state["step"] >= settings.max_steps:
                losses, score, why = validate()
                # Patience counts evaluations that gained less than min_delta; the best is the highest
                # score all the same, the checkpoint Ray Train keeps.
                state["bad_evals"] = 0 if score > state["best_score"] + settings.min_delta else state["bad_evals"] + 1
                if score > state["best_score"]:
                    state.update(best_score=score, best_val=losses["current"], best_step=state["step"])
                    if mlflow is not None and why:
                        mlflow.set_tag(config["run_id"], "selection", f"step {state['step']}: {why}")
                log_validation(losses, score, state["step"])
                report(losses["current"], score)
                stop = state["step"] >= settings.max_steps or state["bad_evals"] >= settings.patience
                if not stop and verdicts is not None:  # a Tune trial: its scheduler's verdict on this report
                    stop = ray.get(verdicts.wait.remote(config["trial_id"], state["step"]))
        for _ in rows:  # finish this epoch's stream so every worker's split ends together
            pass
        state["epoch"] += 1
        if not stepped_this_epoch:
            raise ValueError(f"the train split holds fewer than one batch of {settings.block_size}-token blocks")
