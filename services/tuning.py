"""``genloop tune``: a search over the training settings on Ray Tune, from scratch or from a base.

What an operator reaches for when a model falls short of its target, before changing the data or
the model: the peak learning rate (log-uniform around ``train.learning_rate``), the warm-up, the
micro-batch, the weight decay and, from scratch, the model preset (``tuning``'s search space,
sampled by Tune's own ``BasicVariantGenerator``, seeded by ``train.seed``). The first trial is always
the settings as they are, so the table shows what tuning bought.

Each trial is a Ray Train run under Tune and an MLflow run nested under the tune's
(``services.trials``); ASHA stops a trial whose validation loss at an evaluation falls behind the
others'. All trials score the same held-out blocks with the same tokenizer, so their losses compare.
The tune registers no model: it writes the best settings as a ``train:`` section that
``genloop train --settings FILE`` reads, the trials' table as JSON and their validation curves as a
PNG, under ``reports/tuning/`` and on the tune's MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator
from rich.table import Table

from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.files import atomic_write
from genloop.services.registry import Registry
from genloop.services.training_run import Prepared, check_size, open_run, prepare
from genloop.services.trials import TrialContext, best_trial, run_trial, run_trials
from genloop.training.config import TrainConfig
from genloop.training.cost import cost_report
from genloop.training.errors import UserInputError
from genloop.training.models import PRESETS

logger = logging.getLogger(__name__)

TUNED = ("learning_rate", "warmup_steps", "micro_batch_size", "weight_decay", "preset")  # what a tune writes


@dataclass(frozen=True)
class TuneResult:
    run_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    settings: dict[str, Any]  # the best trial's, as the written file's ``train:`` section holds them
    settings_file: Path
    report: Path  # the trials as JSON
    plot: Path  # their validation curves


def trial_settings(settings: TrainConfig, trial: dict[str, Any]) -> TrainConfig:
    """A trial's settings: the searched ones over ``settings``."""
    update = {"learning_rate": trial["learning_rate"], "micro_batch_size": trial["micro_batch_size"],
              "weight_decay": trial["weight_decay"],
              "warmup_steps": round(trial["warmup_fraction"] * settings.max_steps)}
    if trial.get("preset"):
        update["preset"] = trial["preset"]
    return settings.model_copy(update=update)


def _search_space(config: GenloopConfig, settings: TrainConfig, presets: list[str]) -> tuple[dict, dict]:
    """Tune's search space and the point it starts from: the settings as they are."""
    tuning = config.tuning
    low, high = (settings.learning_rate * scale for scale in tuning.learning_rate_range)
    space: dict[str, Any] = {"learning_rate": tune.loguniform(low, high) if low < high else low,
                             "warmup_fraction": tune.choice(tuning.warmup_fractions),
                             "micro_batch_size": tune.choice(tuning.micro_batch_sizes),
                             "weight_decay": tune.choice(tuning.weight_decays)}
    start: dict[str, Any] = {"learning_rate": settings.learning_rate,
                             "warmup_fraction": min(settings.warmup_steps, settings.max_steps) / settings.max_steps,
                             "micro_batch_size": settings.micro_batch_size, "weight_decay": settings.weight_decay}
    if presets:
        space["preset"], start["preset"] = tune.choice(presets), settings.preset
    return space, start


def _presets(config: GenloopConfig, base: str | None) -> list[str]:
    if base is not None:
        return []
    presets = list(dict.fromkeys([config.train.preset, *config.tuning.presets]))
    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        raise UserInputError(f"unknown preset {', '.join(unknown)} in tuning.presets; known: {', '.join(PRESETS)}")
    return presets


def _run_trial(trial: dict[str, Any], context: TrialContext, prepared: dict[str, Prepared], train_path: str,
               spec: str) -> None:
    start = prepared[trial.get("preset", "")]
    settings = trial_settings(start.settings, trial)
    run_trial(context, start, train_path, settings,
              params={key: str(getattr(settings, key)) for key in TUNED} | {"dataset": spec},
              tags={"dataset": spec})


def _describe(trial: dict) -> str:
    preset = f"{trial['preset']}, " if trial.get("preset") else ""
    return f"{preset}lr {trial['learning_rate']:.2g}, batch {trial['micro_batch_size']}"


def tune_training(config: GenloopConfig, dataset_spec: str, base: str | None = None,
                  show_progress: bool = True, output: Path | None = None) -> TuneResult:
    """Search ``train``'s settings on ``dataset_spec`` (see the module's docstring); write the best
    to ``output`` too when given."""
    if output is not None:
        _check_output(output)
    settings = config.train
    presets = _presets(config, base)
    registry = Registry(config)
    first = prepare(config, dataset_spec, base, settings, None, registry)
    prepared = {"" if base is not None else settings.preset: first}
    try:
        for name in presets[1:]:  # the same tokenizer, so every trial scores the same validation blocks
            prepared[name] = prepare(config, dataset_spec, None, settings.model_copy(update={"preset": name}),
                                     None, registry, tokenizer=first.tokenizer)
        widest = settings.model_copy(update={"micro_batch_size": max(config.tuning.micro_batch_sizes)})
        check_size(first.tokenizer, first.dataset, widest, first.val_blocks["current"])
        return _search(config, registry, prepared, presets, show_progress, output)
    finally:
        for start in prepared.values():
            shutil.rmtree(start.work, ignore_errors=True)


def _check_output(output: Path) -> None:
    """Refuse an ``--output`` the best settings could not be written to, before the trials run."""
    if output.is_dir():
        raise UserInputError(f"--output {output}: a folder; give the settings file's path")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output.parent).close()
    except OSError as exc:
        raise UserInputError(f"--output {output}: cannot write there ({exc.strerror})") from None


def _search(config: GenloopConfig, registry: Registry, prepared: dict[str, Prepared], presets: list[str],
            show_progress: bool, output: Path | None) -> TuneResult:
    first = next(iter(prepared.values()))
    tuning, settings, dataset = config.tuning, first.settings, first.dataset
    eval_every = max(1, min(settings.eval_every, settings.max_steps // 4))  # rungs for ASHA to judge at
    for start in prepared.values():
        start.settings = start.settings.model_copy(update={"eval_every": eval_every})
    space, baseline = _search_space(config, settings, presets)
    run_id = open_run(registry, first, f"tune-{dataset.name}-v{dataset.version}",
                      tags={"search": f"genloop tune, {tuning.trials} trials"},
                      params={f"tuning.{key}": str(value) for key, value in tuning.model_dump().items()})
    client = registry.client
    try:
        connect(config.ray)
        trials, wall = run_trials(
            _run_trial, registry=registry, run_id=run_id, storage_path=config.ray_storage_path,
            name=f"tune-{run_id[:8]}", show_progress=show_progress, unit="steps",
            total_steps=tuning.trials * settings.max_steps, describe=_describe, score_name="-val loss",
            trial_steps=settings.max_steps, eval_every=eval_every, reduction_factor=tuning.reduction_factor,
            concurrent_trials=tuning.concurrent_trials, num_samples=tuning.trials, param_space=space,
            # Tune leaves a generator's concurrency to the generator: max_concurrent_trials is for Searchers.
            search_alg=BasicVariantGenerator(points_to_evaluate=[baseline], random_state=settings.seed,
                                             max_concurrent=tuning.concurrent_trials),
            prepared=prepared, train_path=str(dataset.train_path), spec=dataset.spec)
        best = best_trial(trials, "tune")
        chosen = trial_settings(settings, best)
        values = {key: getattr(chosen, key) for key in TUNED if key != "preset" or presets}
        tokens = sum(t["steps"] * t["micro_batch_size"] for t in trials) * (
            settings.block_size * settings.grad_accum_steps * settings.num_workers)
        cost = cost_report(wall_seconds=wall,
                           train_seconds=sum(t["train_seconds"] for t in trials),
                           device_type="cuda" if settings.use_gpu else "cpu", device_count=settings.num_workers,
                           parameters=first.parameters, tokens_seen=tokens,
                           timed_tokens=sum(t["timed_tokens"] for t in trials), prices=config.cost)
        folder = config.reports_dir / "tuning"
        paths = {kind: folder / f"{run_id[:8]}.{kind}" for kind in ("json", "png", "yaml")}
        atomic_write(paths["json"], json.dumps({"run_id": run_id, "dataset": dataset.spec, "base": first.base,
                                          "best": best["trial"], "settings": values, "trials": trials,
                                          "cost": cost.model_dump()}, indent=1, default=str))
        _plot(trials, best, paths["png"], f"genloop tune on {dataset.spec}: validation loss per trial")
        text = _settings_yaml(values, best, dataset.spec, run_id)
        atomic_write(paths["yaml"], text)
        if output is not None:
            atomic_write(output, text)
        client.set_tag(best["run_id"], "chosen", "true")
        summary = {"best_val_loss": best["val_loss"], "best_step": best["best_step"], **cost.mlflow_metrics()}
        client.log_batch(run_id, metrics=[Metric(key, float(value), 0, 0) for key, value in summary.items()],
                         params=[Param(f"best.{key}", str(value)) for key, value in values.items()])
        for path in paths.values():
            client.log_artifact(run_id, str(path), "tuning")
        client.set_terminated(run_id, "FINISHED")
        logger.info("tune: %d trials; best %s (%s)", len(trials), best["trial"], values)
        return TuneResult(run_id=run_id, trials=trials, best=best, settings=values,
                          settings_file=output or paths["yaml"], report=paths["json"], plot=paths["png"])
    except BaseException:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
        raise


def _settings_yaml(values: dict[str, Any], best: dict[str, Any], spec: str, run_id: str) -> str:
    header = (f"# genloop tune on {spec} (MLflow run {run_id}): the best of its trials, {best['trial']},\n"
              f"# validation loss {best['val_loss']:.4f} at step {best['best_step']}.\n"
              "# Train with them: genloop train --dataset NAME --settings THIS_FILE\n")
    return header + yaml.safe_dump({"train": values}, sort_keys=False)


def _plot(trials: list[dict[str, Any]], best: dict[str, Any], path: Path, title: str) -> None:
    """The trials' validation curves; a trial ASHA stopped is dashed, the best is drawn thick."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 5))
    for trial in trials:
        if not trial["curve"]:
            continue
        steps, losses = zip(*trial["curve"], strict=True)
        axes.plot(steps, losses, linestyle="--" if trial["stopped"] else "-",
                  linewidth=2.5 if trial is best else 1.0, marker="o", markersize=3,
                  label=f"{trial['trial']}: {_describe(trial)}" + (" (best)" if trial is best else ""))
    axes.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    pyplot.close(figure)
    atomic_write(path, png.getvalue())


def trials_table(result: TuneResult) -> Table:
    """The trials as a table for the terminal, best first."""
    table = Table("trial", "preset", "peak lr", "warm-up", "batch", "weight decay", "steps", "best val loss", "",
                  title=f"genloop tune: {len(result.trials)} trials")
    ranked = sorted(result.trials, key=lambda t: -t["best_score"])
    for trial in ranked:
        loss = f"{trial['val_loss']:.4f} @ {trial['best_step']}" if math.isfinite(trial["best_score"]) else "-"
        note = "best" if trial is result.best else (trial["stopped"].split(":")[0] or trial["error"][:40])
        table.add_row(trial["trial"], trial.get("preset", "") or "base", f"{trial['learning_rate']:.2g}",
                      f"{trial['warmup_fraction']:.0%}", str(trial["micro_batch_size"]), f"{trial['weight_decay']:g}",
                      str(trial["steps"]), loss, note)
    return table
