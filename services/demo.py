"""``genloop demo``: the whole loop, end to end, on data that ships with Python.

Each stage the project has is run for real (Ray Data ingestion, Ray Train on CPU workers, MLflow
registry, the evaluation gate and promotion), so the demo doubles as the smoke test a new user
runs first. Round one trains a first model from scratch and promotes it on the absolute bounds;
round two ingests more data, warm-starts from the champion and has to beat it at the gate.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.cluster import connect
from services.config import GenloopConfig
from services.lifecycle import PromotionRefused, promote
from services.registry import Registry
from services.training_run import TrainingRun, train
from training.datasets import ingest

DEMO_DATASET = "python-docs"
DEMO_SOURCES = ["builtin:python-docs"]
DEMO_PROMPTS = ["The for statement is used to", "A list comprehension"]


def run_demo(config: GenloopConfig, max_steps: int, console: Console) -> None:
    first_cap = config.data.max_documents_per_source or 3000  # a few minutes on two CPU cores
    config.train.max_steps = max_steps
    config.train.eval_every = max(10, max_steps // 6)
    connect(config.ray)  # before ingest: Ray Data would otherwise start (or join) a Ray of its own choosing

    console.rule("[bold]round 1: data → train from scratch → gate → champion")
    run = _train_round(config, first_cap, base=None, console=console)
    _promote(config, run, console)
    _samples(config, console)

    console.rule("[bold]round 2: more data → warm start from the champion → gate")
    config.train.learning_rate /= 3  # fine-tuning: smaller steps than pre-training
    run = _train_round(config, first_cap * 2, base="champion", console=console)
    _promote(config, run, console)
    _samples(config, console)


def _train_round(config: GenloopConfig, cap: int, base: str | None, console: Console) -> TrainingRun:
    config.data.max_documents_per_source = cap
    result = ingest(DEMO_SOURCES, DEMO_DATASET, config.data, config.datasets_dir)
    counts = result.version.manifest["counts"]
    console.print(f"dataset {DEMO_DATASET}:v{result.version.version} ({'new' if result.created else 'unchanged'}): "
                  f"{counts['kept']} documents kept of {counts['read']}, dropped {counts['dropped']}")
    run = train(config, f"{DEMO_DATASET}:v{result.version.version}", base=base)
    table = Table("metric", "value", title=f"training run {run.run_id[:8]} → v{run.version}")
    for key, value in {**run.metrics, "tokens/s": run.cost.tokens_per_second, "cost $": run.cost.cost_usd,
                       "energy kWh": run.cost.energy_kwh, "MFU": run.cost.mfu}.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    return run


def _promote(config: GenloopConfig, run: TrainingRun, console: Console) -> None:
    try:
        report = promote(config, run.version, actor="genloop demo")
    except PromotionRefused as refused:
        console.print(f"[yellow]gate refused v{run.version}[/]: {refused}")
        return
    for rule in report.rules:
        console.print(f"  {'[green]pass' if rule.passed else '[red]fail'}[/] {rule.rule}: {rule.reason}")
    console.print(f"[green]v{run.version} is the champion[/] "
                  f"(report {config.reports_dir / 'evaluations' / report.id}.html)")


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
