"""Training throughput: genloop's Ray Train loop (1 worker) against a bare PyTorch loop.

Both loops train the same freshly initialised model on the same parquet data, with the same
tokenizer, packing, batch, optimizer and step function (``training.loop``); the only difference
is Ray Train (worker actor, Ray Data streaming, report/checkpoint machinery). tokens/s counts
time inside optimizer steps, data fetching included, in both. Prints JSON; goal ≥ 0.9×.

    python benchmarks/train_throughput.py [--preset tiny] [--steps 80] [--batch 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from genloop.services.cluster import own_state_api
from genloop.training.config import TrainConfig
from genloop.training.loop import TEXT_BATCH_ROWS, make_optimizer, make_schedule, packed_batches, train_step
from genloop.training.models import build_model, parameter_count
from genloop.training.tokenizer import train_tokenizer
from genloop.training.trainer import fit, validation_blocks


def corpus() -> list[str]:
    texts = [p.strip() for topic in pydoc_data.topics.topics.values() for p in topic.split("\n\n")]
    return [t for t in texts if len(t) >= 64]


def bare_loop(parquet: Path, init_dir: Path, settings: TrainConfig, threads: int) -> dict:
    """The baseline: one process, no Ray, the same work per step."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    model = AutoModelForCausalLM.from_pretrained(init_dir)
    model.train()
    optimizer = make_optimizer(model, settings)
    schedule = make_schedule(optimizer, settings)
    device = torch.device("cpu")
    wall_started = time.perf_counter()
    steps, tokens, seconds = 0, 0, 0.0  # the first step is not timed, as in training.loop
    while steps < settings.max_steps:
        rows = (b.column("text").to_pylist()
                for b in pq.ParquetFile(parquet).iter_batches(batch_size=TEXT_BATCH_ROWS, columns=["text"]))
        batches = packed_batches(rows, tokenizer, settings.block_size, settings.micro_batch_size)
        while steps < settings.max_steps:
            started = time.perf_counter()
            micro = [b for _, b in zip(range(settings.grad_accum_steps), batches, strict=False)]
            if len(micro) < settings.grad_accum_steps:
                break
            train_step(model, micro, optimizer, schedule, settings, device)
            if steps > 0:
                seconds += time.perf_counter() - started
                tokens += sum(b.numel() for b in micro)
            steps += 1
    return {"steps": steps, "tokens": tokens, "train_seconds": seconds,
            "tokens_per_second": tokens / seconds, "wall_seconds": time.perf_counter() - wall_started}


def ray_loop(parquet: Path, init_dir: Path, settings: TrainConfig, work: Path, texts: list[str]) -> dict:
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.create_experiment("bench", artifact_location=(work / "art").as_uri())
    run = client.create_run(experiment)
    dataset = ray.data.read_parquet(str(parquet))
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    started = time.perf_counter()
    outcome = fit(train_dataset=dataset, validation_blocks={"current": validation_blocks(texts, tokenizer, settings)},
                  init_model_dir=init_dir, settings=settings,
                  storage_path=str(work / "ray"), run_name="bench", tracking_uri=client.tracking_uri,
                  run_id=run.info.run_id, show_progress=False)
    metrics = outcome.metrics
    return {"steps": metrics["step"], "tokens": metrics["timed_tokens"], "train_seconds": metrics["train_seconds"],
            "tokens_per_second": metrics["timed_tokens"] / metrics["train_seconds"],
            "wall_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both loops (= CPUs of the Ray worker; Ray gets one more for Ray Data)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = parser.parse_args()

    settings = TrainConfig(preset=args.preset, max_steps=args.steps, eval_every=args.steps, eval_batches=1,
                           micro_batch_size=args.batch, block_size=args.block, num_workers=1,
                           cpus_per_worker=args.threads, warmup_steps=5)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = corpus()
        parquet = work / "train.parquet"
        pq.write_table(pa.table({"text": texts}), parquet)
        tokenizer = train_tokenizer(texts, 4096)
        model = build_model(args.preset, tokenizer, args.block, seed=0)
        init_dir = work / "init"
        model.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)

        own_state_api()  # a stale `ray start` cluster would add 12 s to the run's end (services.cluster)
        ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ours = ray_loop(parquet, init_dir, settings, work, texts)
        ray.shutdown()
        baseline = bare_loop(parquet, init_dir, settings, args.threads)

    result = {
        "benchmark": "train_throughput",
        "model": {"preset": args.preset, "parameters": parameter_count(model)},
        "batch": {"micro_batch_size": args.batch, "block_size": args.block, "steps": args.steps,
                  "threads": args.threads},
        "bare_pytorch": baseline,
        "genloop_ray_train_1_worker": ours,
        "ratio_tokens_per_second": ours["tokens_per_second"] / baseline["tokens_per_second"],
        "ratio_wall": baseline["wall_seconds"] / ours["wall_seconds"],
        "goal_ratio_tokens_per_second": 0.9,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
