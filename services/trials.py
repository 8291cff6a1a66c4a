"""Ray Tune trials that are Ray Train runs: what a retrain's search (``services.search``) and
``genloop tune`` (``services.tuning``) share.

Each trial is one Ray Train run under Tune as Ray documents it for Train V2 (a function trainable
launches a ``TorchTrainer`` whose reports reach Tune through ``TuneReportCallback``), and one MLflow
run nested under the search's (MLflow's ``mlflow.parentRunId``). Tune's ASHA judges the score every
evaluation reports (higher is better: the gate's question for a retrain, minus the validation loss
otherwise); its stops reach the trial's workers through ``Verdicts`` so that a stopped trial ends at
the evaluation ASHA judged, with nothing run past it and nothing left reserved.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from genloop.services.console import prints_to_log
from genloop.services.leftovers import owner_tags
from genloop.services.registry import Registry
from genloop.services.training_run import Prepared
from genloop.training.config import TrainConfig
from genloop.training.trainer import TrainingFailed, checkpoint_uri, fit_trial

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a trial's run under the search's
# A trial's trainable only drives a TorchTrainer, whose workers reserve CPUs of their own; Tune
# refuses an empty request, and a whole CPU would starve Ray Data on a two-CPU machine.
TRIAL_DRIVER_CPUS = 0.01
VERDICT_TIMEOUT_S = 600.0  # how long a trial's workers wait for the scheduler's verdict on a report


class Verdicts:
    """The scheduler's verdict on each evaluation a trial reported, which its workers wait for.

    Tune stops a function trial by ending its actor: with a Ray Train run inside, that kills the
    run's controller mid-flight, so its workers train on for steps nobody counts (a budget would not
    hold) and its CPUs stay reserved until Ray Train's cleaner notices (which needs the dashboard).
    Instead the scheduler (``GracefulASHA``) posts ASHA's verdict here and tells Tune to go on; the
    workers, waiting after each report, end the run themselves on a stop."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, int], bool] = {}

    def post(self, trial_id: str, step: int, stop: bool) -> None:
        self._verdicts[(trial_id, step)] = stop

    async def wait(self, trial_id: str, step: int, timeout_s: float = VERDICT_TIMEOUT_S) -> bool:
        """True to stop; a verdict that never comes (Tune's driver gone) is a stop."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (trial_id, step) not in self._verdicts and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self._verdicts.get((trial_id, step), True)

    def stopped_at(self, trial_id: str) -> int | None:
        return min((step for (trial, step), stop in self._verdicts.items() if trial == trial_id and stop),
                   default=None)


class GracefulASHA(ASHAScheduler):
    """Tune's ASHA, its stops delivered through ``Verdicts`` (see there) rather than by ending the trial."""

    def __init__(self, verdicts: Any, **asha: Any) -> None:
        super().__init__(**asha)
        self._verdicts = verdicts

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        ray.get(self._verdicts.post.remote(trial.trial_id, int(result["step"]), decision == TrialScheduler.STOP))
        return TrialScheduler.CONTINUE


def make_verdicts() -> Any:
    """A ``Verdicts`` actor for one search; ``ray.kill`` it when the search ends."""
    return ray.remote(num_cpus=0)(Verdicts).remote()


@dataclass(frozen=True)
class TrialContext:
    """Where every trial of one search logs and checkpoints, put in Ray's object store once
    (``tune.with_parameters``) with what the search's own trainable needs."""

    storage_path: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    owner: dict[str, str]
    verdicts: Any  # a Verdicts actor


def run_trial(context: TrialContext, prepared: Prepared, train_path: str, settings: TrainConfig,
              params: dict[str, str], tags: dict[str, str]) -> None:
    """One trial, in Tune's trial actor: a child MLflow run with ``params`` and ``tags``, and a Ray
    Train run of ``settings`` from ``prepared``'s initial model on ``train_path`` that reports to Tune."""
    client = MlflowClient(context.tracking_uri)
    name, trial_id = tune.get_context().get_trial_name(), tune.get_context().get_trial_id()
    run = client.create_run(context.experiment_id, run_name=name, tags={
        PARENT_TAG: context.parent_run_id, "tune_trial_id": trial_id, **tags, **context.owner})
    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in params.items()])
    try:
        fit_trial(train_dataset=ray.data.read_parquet(train_path), validation_blocks=prepared.val_blocks,
                  init_model_dir=prepared.init_dir, settings=settings, storage_path=context.storage_path,
                  run_name=f"{name}-{run.info.run_id[:8]}", tracking_uri=context.tracking_uri,
                  run_id=run.info.run_id, score=prepared.score, verdicts=context.verdicts, trial_id=trial_id)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    stopped = ray.get(context.verdicts.stopped_at.remote(trial_id))
    if stopped is not None:
        client.set_tag(run.info.run_id, "stopped", f"by ASHA at step {stopped}: its score was below the "
                                                   "trials' cutoff at that rung")
    client.set_terminated(run.info.run_id, "FINISHED")


class TrialProgress(tune.Callback):
    """The search's steps as one progress bar, with the trial at work (``describe`` says what it
    tries) and the best score so far."""

    def __init__(self, bar: Progress, total_steps: int, describe: Callable[[dict], str], score: str) -> None:
        self._bar, self._best, self._describe, self._score = bar, -math.inf, describe, score
        self._steps: dict[str, int] = {}
        self._task = bar.add_task("search", total=total_steps, status="starting trials…")

    def __getstate__(self) -> dict:  # Tune saves its run config with the experiment; a live bar stays here
        return {**self.__dict__, "_bar": None, "_describe": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self._bar is None:
            return
        self._steps[trial.trial_id] = int(result.get("step", 0))
        self._best = max(self._best, float(result.get("score", -math.inf)))
        self._bar.update(self._task, completed=sum(self._steps.values()), status=(
            f"{trial.trial_id}: {self._describe(trial.config)}, step {result.get('step')}; "
            f"best {self._score} {self._best:+.4g}"))


def progress_bar(show: bool, unit: str) -> Progress:
    """The search's bar, on this process's stdout as it is now (``run_search`` sends Tune's prints elsewhere)."""
    columns = [TextColumn("[bold]search"), BarColumn(), TextColumn(f"{{task.completed}}/{{task.total}} {unit}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    return Progress(*columns, disable=not show, console=Console(file=sys.stdout))


def run_search(trainable: Callable, context: TrialContext, *, name: str, trial_steps: int, eval_every: int,
               reduction_factor: float, concurrent_trials: int, num_samples: int, search_alg: Any,
               param_space: dict | None = None, callbacks: list | None = None) -> tune.ResultGrid:
    """Tune's ``Tuner`` over ``trainable`` (which calls ``run_trial``) with ASHA on the reported score."""
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPUS}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="score", mode="max", search_alg=search_alg, num_samples=num_samples,
            # A Searcher is limited by Tune; a generator (genloop tune's) limits itself.
            max_concurrent_trials=concurrent_trials if isinstance(search_alg, Searcher) else None,
            reuse_actors=True,
            # max_t past the last step: a trial that ends on its own is never stopped at its end.
            scheduler=GracefulASHA(context.verdicts, time_attr="step", max_t=trial_steps + 1,
                                   grace_period=eval_every, reduction_factor=reduction_factor)),
        run_config=tune.RunConfig(name=name, storage_path=context.storage_path, verbose=0, callbacks=callbacks),
    )
    with prints_to_log():
        return tuner.fit()


def run_trials(trial: Callable, *, registry: Registry, run_id: str, storage_path: str, name: str,
               show_progress: bool, unit: str, total_steps: int, describe: Callable[[dict], str], score_name: str,
               trial_steps: int, eval_every: int, reduction_factor: float, concurrent_trials: int, num_samples: int,
               search_alg: Any, param_space: dict | None = None,
               **trial_args: Any) -> tuple[list[dict[str, Any]], float]:
    """A search's trials under the MLflow run ``run_id``, each ``trial(config, context, **trial_args)``
    (which calls ``run_trial``), with a progress bar of ``total_steps``; their rows and the wall time."""
    context = TrialContext(storage_path=storage_path, tracking_uri=registry.tracking_uri,
                           experiment_id=registry.experiment_id(), parent_run_id=run_id, owner=owner_tags(),
                           verdicts=make_verdicts())
    started = time.perf_counter()
    try:
        with progress_bar(show_progress, unit) as bar:
            grid = run_search(tune.with_parameters(trial, context=context, **trial_args), context, name=name,
                              trial_steps=trial_steps, eval_every=eval_every, reduction_factor=reduction_factor,
                              concurrent_trials=concurrent_trials, num_samples=num_samples, search_alg=search_alg,
                              param_space=param_space,
                              callbacks=[TrialProgress(bar, total_steps, describe, score_name)])
    finally:
        ray.kill(context.verdicts)
    return trial_rows(grid, registry.client, run_id, storage_path), time.perf_counter() - started


def best_trial(rows: list[dict[str, Any]], search: str) -> dict[str, Any]:
    """The trial whose best checkpoint scored highest; none reported one is a failed ``search``."""
    best = max((row for row in rows if row["checkpoint"]), key=lambda row: row["best_score"], default=None)
    if best is None:
        raise TrainingFailed(f"no trial of the {search} reported a checkpoint: "
                             + "; ".join(row["error"] for row in rows if row["error"]))
    return best


def trial_rows(grid: tune.ResultGrid, client: MlflowClient, parent_run_id: str,
               storage_path: str) -> list[dict[str, Any]]:
    """One row per trial: its config, what it ran, its best checkpoint, its validation curve, its run,
    and why it stopped where ASHA stopped it."""
    runs = {run.data.tags.get("tune_trial_id"): run for run in client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")}
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id", "")  # Tune adds it to every result
        frame = result.metrics_dataframe
        row: dict[str, Any] = {"trial": trial_id, **(result.config or {}),
                               "error": str(result.error) if result.error else "", "checkpoint": "",
                               "best_score": -math.inf, "curve": []}
        if frame is not None and "score" in frame and len(frame):
            top = frame.loc[frame["score"].idxmax()]
            last = frame.iloc[-1]
            losses = zip(frame["step"], frame["val_loss"], strict=True)
            path = str(top.get("checkpoint_path", "") or "")
            row.update(checkpoint=checkpoint_uri(storage_path, path) if path else "", best_score=float(top["score"]),
                       best_step=int(top["step"]), val_loss=float(top["val_loss"]),
                       initial_val_loss=float(top["initial_val_loss"]), steps=int(last["step"]),
                       restarts=int(last["restarts"]), train_seconds=float(last["train_seconds"]),
                       timed_tokens=int(last["timed_tokens"]),
                       # the initial model's loss starts the curve: it is logged, not reported
                       curve=[[0, float(top["initial_val_loss"])]] + [[int(s), float(v)] for s, v in losses])
        else:
            row.update(steps=0, restarts=0, train_seconds=0.0, timed_tokens=0)
        run = runs.get(trial_id)  # searched after every trial ended: its tags are final
        tags = run.data.tags if run is not None else {}
        row.update(run_id=run.info.run_id if run is not None else "", dataset=tags.get("dataset", ""),
                   selection=tags.get("selection", ""), stopped=tags.get("stopped", ""))
        rows.append(row)
    return rows
