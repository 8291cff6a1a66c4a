"""``genloop demo``: the whole loop, end to end, on data that ships with Python.

Each stage the project has is run for real (Ray Data ingestion, Ray Train on CPU workers, MLflow
registry, the evaluation gate and promotion, Ray Serve, the inference log, the scheduler's jobs),
so the demo doubles as the smoke test a new user runs first. Round one trains a first model from
scratch and promotes it on the absolute bounds; round two is the scheduler's retrain job: it
ingests more data, warm-starts from the champion and has to beat it at the gate. Then the
champion serves held-out prompts over the OpenAI API, and the scheduler's drift job compares that
traffic with what the champion was trained on.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.cluster import connect
from services.config import GenloopConfig
from services.registry import Registry
from services.retrain import RetrainResult, retrain
from services.scheduler import GenloopScheduler
from services.serving_control import start_serving, stop_serving
from serving.app import VERSION_HEADER
from serving.inference_log import read_inference_log
from training.datasets import ingest, resolve_dataset

DEMO_DATASET = "python-docs"
DEMO_SOURCES = ["builtin:python-docs"]
DEMO_PROMPTS = ["The for statement is used to", "A list comprehension"]
TRAFFIC = 60  # held-out prompts sent to the endpoint: above monitoring.drift_min_samples


def run_demo(config: GenloopConfig, max_steps: int, console: Console) -> None:
    first_cap = config.data.max_documents_per_source or 3000  # a few minutes on two CPU cores
    config.train.max_steps = max_steps
    config.train.eval_every = max(10, max_steps // 6)
    connect(config.ray)  # before ingest: Ray Data would otherwise start (or join) a Ray of its own choosing

    console.rule("[bold]round 1: data → train from scratch → gate → champion")
    config.data.max_documents_per_source = first_cap
    _ingest(config, console)
    config.scheduler.sources, config.scheduler.dataset = [], DEMO_DATASET  # the round trains on what was ingested
    _show_round(config, retrain(config, "demo", show_progress=True, actor="genloop demo"), console)
    _samples(config, console)

    console.rule("[bold]round 2: the scheduler's retrain job — more data → warm start from the champion → gate")
    config.train.learning_rate /= 3  # fine-tuning: smaller steps than pre-training
    config.data.max_documents_per_source = first_cap * 2
    config.scheduler.sources = DEMO_SOURCES
    scheduler = GenloopScheduler(config)
    with scheduler.exclusive():
        _job(scheduler, "retrain", console)

    console.rule("[bold]serving: the champion over the OpenAI API → inference log → drift job")
    _serve_and_check_drift(config, scheduler, console)


def _job(scheduler: GenloopScheduler, job: str, console: Console) -> None:
    outcome = scheduler.run(job, "demo", show_progress=True)
    detail = next(run.detail for run in scheduler.history.recent(5) if run.job == job)  # not a retrain it started
    console.print(f"{job} job: [bold]{outcome}[/] — {detail}", highlight=False)


def _serve_and_check_drift(config: GenloopConfig, scheduler: GenloopScheduler, console: Console) -> None:
    dataset = resolve_dataset(config.datasets_dir, DEMO_DATASET)
    texts = pq.read_table(dataset.validation_path, columns=["text"]).column("text").to_pylist()
    prompts = [" ".join(text.split()[:12]) for text in texts[:TRAFFIC]]
    url = f"http://{config.serving.host}:{config.serving.port}/v1/completions"
    watcher = start_serving(config)
    try:
        for prompt in DEMO_PROMPTS:
            answer, version = _complete(url, config.serving.model_name, prompt, max_tokens=30)
            console.print(f"served by v{version}: [bold]{prompt}[/]{answer}")
        for prompt in prompts:
            _complete(url, config.serving.model_name, prompt, max_tokens=8)
        sent = len(DEMO_PROMPTS) + len(prompts)
        deadline = time.time() + 60  # replicas append to the inference log in batches, every 2 s
        while len(read_inference_log(config.inference_log_dir)) < sent and time.time() < deadline:
            time.sleep(0.5)
        console.print(f"{sent} requests answered; {len(read_inference_log(config.inference_log_dir))} rows in "
                      f"{config.inference_log_dir}")
        with scheduler.exclusive():
            _job(scheduler, "drift", console)
    finally:
        watcher.stop()
        stop_serving(own_cluster=True)


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """One greedy completion through the OpenAI API; its text and the version that served it."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["choices"][0]["text"], response.headers[VERSION_HEADER]


def _ingest(config: GenloopConfig, console: Console) -> None:
    result = ingest(DEMO_SOURCES, DEMO_DATASET, config.data, config.datasets_dir)
    counts = result.version.manifest["counts"]
    console.print(f"dataset {result.version.spec} ({'new' if result.created else 'unchanged'}): "
                  f"{counts['kept']} documents kept of {counts['read']}, dropped {counts['dropped']}")


def _show_round(config: GenloopConfig, result: RetrainResult, console: Console) -> None:
    """The training run's metrics and cost, the gate's verdict rule by rule, and the outcome."""
    if result.run is not None:
        run = result.run
        table = Table("metric", "value", title=f"training run {run.run_id[:8]} → v{run.version}")
        for key, value in {**run.metrics, "tokens/s": run.cost.tokens_per_second, "cost $": run.cost.cost_usd,
                           "energy kWh": run.cost.energy_kwh, "MFU": run.cost.mfu}.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
    for rule in result.report.rules if result.report is not None else []:
        console.print(f"  {'[green]pass' if rule.passed else '[red]fail'}[/] {rule.rule}: {rule.reason}")
    colour = {"promoted": "green", "rejected": "yellow"}.get(result.outcome, "default")
    report = f" (report {config.reports_dir / 'evaluations' / result.report.id}.html)" if result.report else ""
    console.print(f"[{colour}]{result.outcome}[/]: {result.detail}{report}", highlight=False)


def _samples(config: GenloopConfig, console: Console) -> None:
    registry = Registry(config)
    champion = registry.resolve("champion")
    path = registry.local_path(champion)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for prompt in DEMO_PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=30, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        console.print(f"champion v{champion.version}: [bold]{prompt}[/]"
                      f"{tokenizer.decode(output[0, inputs['input_ids'].shape[1]:])}")
