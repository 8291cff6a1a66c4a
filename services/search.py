"""A warm-start retrain searches its mix on Ray Tune, all trials together within the retrain budget.

What decides forgetting against learning (how much old text is replayed, how hard the new data is
learned: the peak learning rate, and how long) differs from one shift to the next; numbers tuned
on one shift miss on another. So a retrain runs a few trials, each one Ray Train run under Tune as
Ray documents it (the trainable launches a ``TorchTrainer`` whose reports reach Tune through
``TuneReportCallback``), each its own MLflow run under the retrain's, and each scored at every
evaluation by the gate's question (``services.selection``). Tune's ASHA stops a trial whose gate
score falls below the best half of the trials' scores at the same step.

The budget is kept by the search algorithm, not by trusting the scheduler: ``BudgetedSearch`` (a
Tune ``Searcher``) grants each trial at most ``trial_budget`` of the budget's steps when it starts,
charges it the steps it ran and gives the rest back to the next trials; it starts no trial the
budget cannot give an evaluation's worth of steps. A trial runs exactly the steps it reported: ASHA's
stop reaches its workers at the evaluation it judged (``Verdicts``). So all trials together never
spend more than ``retrain_budget`` of the lineage's from-scratch compute, side by side on a cluster
or one at a time here. The trials start in order: today's defaults first, then the other replay
shares in turn with learning rates sampled log-uniformly (Tune's own ``loguniform``).

The candidate is the best checkpoint of all trials by gate score; the retrain's MLflow run holds it,
the cost of all trials and the trials' table (``search/trials.json``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.leftovers import owner_tags
from genloop.services.registry import Registry
from genloop.services.schedule import RetrainSearchConfig
from genloop.services.selection import Selection
from genloop.services.training_run import Prepared, TrainingRun, check_size, open_run, prepare, register
from genloop.training.config import TrainConfig
from genloop.training.cost import cost_report
from genloop.training.datasets import DatasetVersion
from genloop.training.errors import UserInputError
from genloop.training.replay import build_mix
from genloop.training.trainer import TrainingFailed, fit_trial

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a trial's run under the retrain's
TRIALS_ARTIFACT = "search/trials.json"
# A trial's trainable only drives a TorchTrainer, whose workers reserve CPUs of their own; Tune
# refuses an empty request, and a whole CPU would starve Ray Data on a two-CPU machine.
TRIAL_DRIVER_CPUS = 0.01
VERDICT_TIMEOUT_S = 600.0  # how long a trial's workers wait for the scheduler's verdict on a report


@dataclass(frozen=True)
class TrialPlan:
    replay_fraction: float
    learning_rate: float


def trial_plans(search: RetrainSearchConfig, replay_fraction: float, learning_rate: float,
                seed: int) -> list[TrialPlan]:
    """The trials in the order they start: today's defaults first, then the other replay shares in turn,
    each with a learning rate drawn log-uniformly from ``learning_rate_range`` × ``learning_rate``."""
    others = [fraction for fraction in search.replay_fractions if fraction != replay_fraction] \
        or search.replay_fractions
    low, high = (learning_rate * scale for scale in search.learning_rate_range)
    rates = np.ravel(tune.loguniform(low, high).sample(size=max(1, search.trials - 1),
                                                       random_state=np.random.RandomState(seed)))
    return [TrialPlan(replay_fraction, learning_rate)] + [
        TrialPlan(others[i % len(others)], float(rates[i])) for i in range(search.trials - 1)]


class BudgetedSearch(Searcher):
    """Hands Tune the trials of ``plans`` while the budget lasts (see the module's docstring)."""

    def __init__(self, plans: list[TrialPlan], budget_steps: int, trial_steps: int, eval_every: int) -> None:
        super().__init__()
        self._plans = list(plans)
        self._remaining = budget_steps
        self._trial_steps = trial_steps
        self._eval_every = eval_every
        self._granted: dict[str, int] = {}
        self.charged: dict[str, int] = {}  # trial id → steps charged to the budget once it ended

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self._plans or (self._remaining < self._eval_every and not self._granted):
            return Searcher.FINISHED
        if self._remaining < self._eval_every:
            return None  # a running trial may still give steps back
        plan = self._plans.pop(0)
        steps = min(self._trial_steps, self._remaining)
        self._remaining -= steps
        self._granted[trial_id] = steps
        return {"replay_fraction": plan.replay_fraction, "learning_rate": plan.learning_rate, "max_steps": steps}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        granted = self._granted.pop(trial_id, 0)
        # A trial stops at the evaluation it reported last (``Verdicts``): that step is all it ran. A
        # failed one may have run further: it is charged all it was granted.
        charged = granted if error or not result else min(granted, int(result.get("step", 0)))
        self.charged[trial_id] = charged
        self._remaining += granted - charged


class Verdicts:
    """The scheduler's verdict on each evaluation a trial reported, which its workers wait for.

    Tune stops a function trial by ending its actor: with a Ray Train run inside, that kills the
    run's controller mid-flight, so its workers train on for steps nobody counts (the budget would not
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


@dataclass(frozen=True)
class _Context:
    """What every trial needs, put in Ray's object store once (``tune.with_parameters``)."""

    mixes: dict[float, tuple[str, str]]  # replay fraction → (train split, dataset spec)
    prepared: Prepared
    storage_path: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    owner: dict[str, str]
    verdicts: Any  # a Verdicts actor


def trial_settings(settings: TrainConfig, learning_rate: float, max_steps: int) -> TrainConfig:
    """A trial's schedule: warm-up and decay over its own steps, evaluations on the search's grid."""
    return settings.model_copy(update={"learning_rate": learning_rate, "max_steps": max_steps,
                                       "warmup_steps": min(settings.warmup_steps, max_steps // 10)})


def _run_trial(trial: dict[str, Any], context: _Context) -> None:
    """One trial, in Tune's trial actor: a child MLflow run and a Ray Train run that reports to Tune."""
    prepared = context.prepared
    train_path, spec = context.mixes[trial["replay_fraction"]]
    settings = trial_settings(prepared.settings, trial["learning_rate"], trial["max_steps"])
    client = MlflowClient(context.tracking_uri)
    name, trial_id = tune.get_context().get_trial_name(), tune.get_context().get_trial_id()
    run = client.create_run(context.experiment_id, run_name=name, tags={
        PARENT_TAG: context.parent_run_id, "dataset": spec, "tune_trial_id": trial_id, **context.owner})
    client.log_batch(run.info.run_id, params=[Param("replay_fraction", str(trial["replay_fraction"])),
                                              Param("learning_rate", f"{trial['learning_rate']:.3g}"),
                                              Param("max_steps", str(trial["max_steps"])), Param("dataset", spec)])
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
        client.set_tag(run.info.run_id, "stopped", f"by ASHA at step {stopped}: its gate score was below the "
                                                   "trials' cutoff at that rung")
    client.set_terminated(run.info.run_id, "FINISHED")


class _Progress(tune.Callback):
    """The budget's steps as one progress bar, with the trial at work and the best score so far."""

    def __init__(self, bar: Progress, budget_steps: int) -> None:
        self._bar, self._best = bar, -math.inf
        self._steps: dict[str, int] = {}
        self._task = bar.add_task("search", total=budget_steps, status="starting trials…")

    def __getstate__(self) -> dict:  # Tune saves its run config with the experiment; a live bar stays here
        return {**self.__dict__, "_bar": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self._bar is None:
            return
        self._steps[trial.trial_id] = int(result.get("step", 0))
        self._best = max(self._best, float(result.get("score", -math.inf)))
        config = trial.config
        self._bar.update(self._task, completed=sum(self._steps.values()), status=(
            f"{trial.trial_id}: replay {config['replay_fraction']:g}, lr {config['learning_rate']:.2g}, "
            f"step {result.get('step')}; best gate score {self._best:+.2%}"))


def search_mixes(config: GenloopConfig, fresh: DatasetVersion, seen: list[DatasetVersion],
                 plans: list[TrialPlan]) -> dict[float, DatasetVersion]:
    """The training mix of each replay share the trials take (``training.replay.build_mix``)."""
    mixes = {plan.replay_fraction: build_mix(config.datasets_dir, fresh, seen, plan.replay_fraction,
                                             seed=config.train.seed) for plan in plans}
    if any(mix is None for mix in mixes.values()):
        raise UserInputError(f"{fresh.spec} holds no document the champion's lineage has not seen")
    return mixes


def search_retrain(config: GenloopConfig, plans: list[TrialPlan], mixes: dict[float, DatasetVersion],
                   settings: TrainConfig, selection: Selection, show_progress: bool = False,
                   on_run: Callable[[str], None] | None = None) -> TrainingRun:
    """Search warm starts of the champion, the trials of ``plans`` on ``mixes`` (``search_mixes``),
    within ``settings.max_steps`` (the budget's steps); register the best checkpoint of all trials."""
    search = config.scheduler.search
    budget = settings.max_steps
    trial_steps = max(1, math.ceil(budget * search.trial_budget))
    eval_every = max(1, min(settings.eval_every, trial_steps // 4))
    settings = settings.model_copy(update={"eval_every": eval_every})
    registry = Registry(config)
    first = mixes[plans[0].replay_fraction]
    prepared = prepare(config, first.spec, "champion", settings, selection, registry)
    client = registry.client
    try:
        for mix in mixes.values():
            check_size(prepared.tokenizer, mix, settings, prepared.val_blocks["current"])
    except BaseException:
        shutil.rmtree(prepared.work, ignore_errors=True)
        raise
    run_id = open_run(registry, prepared, f"retrain-{first.name}-v{first.version}",
                      tags={"search": f"ray-tune, {len(plans)} trials"},
                      params={"search.budget_steps": str(budget), "search.trial_steps": str(trial_steps)})
    try:
        if on_run is not None:
            on_run(run_id)
        connect(config.ray)
        searcher = BudgetedSearch(plans, budget, trial_steps, eval_every)
        verdicts = ray.remote(num_cpus=0)(Verdicts).remote()  # an actor: the trials' workers wait on it
        context = _Context(mixes={f: (str(m.train_path), m.spec) for f, m in mixes.items()}, prepared=prepared,
                           storage_path=config.ray_storage_path, tracking_uri=registry.tracking_uri,
                           experiment_id=registry.experiment_id(), parent_run_id=run_id, owner=owner_tags(),
                           verdicts=verdicts)
        started = time.perf_counter()
        columns = [TextColumn("[bold]search"), BarColumn(), TextColumn("{task.completed}/{task.total} budget steps"),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
        with Progress(*columns, disable=not show_progress) as bar:
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(_run_trial, context=context), {"cpu": TRIAL_DRIVER_CPUS}),
                tune_config=tune.TuneConfig(
                    metric="score", mode="max", search_alg=searcher, num_samples=len(plans),
                    max_concurrent_trials=search.concurrent_trials,
                    # max_t past the last step: a trial that ends on its own is never stopped at its end.
                    scheduler=GracefulASHA(verdicts, time_attr="step", max_t=trial_steps + 1,
                                           grace_period=eval_every, reduction_factor=search.reduction_factor)),
                run_config=tune.RunConfig(name=f"search-{run_id[:8]}", storage_path=config.ray_storage_path,
                                          verbose=0, callbacks=[_Progress(bar, budget)]),
            )
            grid = tuner.fit()
        ray.kill(verdicts)
        wall = time.perf_counter() - started
        trials = _trials_table(grid, searcher, client, run_id)
        best = max((t for t in trials if t["checkpoint"]), key=lambda t: t["best_score"], default=None)
        if best is None:
            raise TrainingFailed("no trial of the search reported a checkpoint: "
                                 + "; ".join(t["error"] for t in trials if t["error"]))
        client.set_tag(best["run_id"], "chosen", "true")
        client.set_tag(run_id, "dataset", best["dataset"])
        client.set_tag(run_id, "selection", f"{best['trial']} (replay {best['replay_fraction']:g}, "
                                            f"lr {best['learning_rate']:.2g}) {best['selection']}")
        client.log_dict(run_id, {"budget_steps": budget, "trial_steps": trial_steps, "trials": trials},
                        TRIALS_ARTIFACT)
        tokens_per_step = (settings.block_size * settings.micro_batch_size * settings.grad_accum_steps
                           * settings.num_workers)
        cost = cost_report(
            wall_seconds=wall, train_seconds=sum(t["train_seconds"] for t in trials),
            device_type="cuda" if settings.use_gpu else "cpu", device_count=settings.num_workers,
            parameters=prepared.parameters, tokens_seen=sum(t["charged_steps"] for t in trials) * tokens_per_step,
            timed_tokens=sum(t["timed_tokens"] for t in trials), prices=config.cost,
            initial_compute_flops=prepared.initial[1] if prepared.initial else None)
        prepared.tags["dataset"] = best["dataset"]
        prepared.tags["dataset_hash"] = mixes[best["replay_fraction"]].manifest["content_hash"]
        metrics = {"best_val_loss": best["val_loss"], "initial_val_loss": best["initial_val_loss"],
                   "best_step": best["best_step"], "step": sum(t["steps"] for t in trials),
                   "restarts": sum(t["restarts"] for t in trials), "best_score": best["best_score"]}
        result = replace(register(registry, prepared, run_id, Path(best["checkpoint"]), metrics, cost),
                         trials=tuple(trials))
        logger.info("search: %d trials, %d of %d budget steps; kept %s", len(trials),
                    sum(t["charged_steps"] for t in trials), budget, result.selection)
        return result
    except BaseException:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(prepared.work, ignore_errors=True)


def _trials_table(grid: tune.ResultGrid, searcher: BudgetedSearch, client: MlflowClient,
                  parent_run_id: str) -> list[dict[str, Any]]:
    """One row per trial: its settings, what it ran and was charged, its best checkpoint, and why it
    stopped where ASHA stopped it."""
    runs = {run.data.tags.get("tune_trial_id"): run for run in client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")}
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id", "")  # Tune adds it to every result
        frame = result.metrics_dataframe
        config = result.config or {}
        row: dict[str, Any] = {
            "trial": trial_id, "replay_fraction": config.get("replay_fraction"),
            "learning_rate": config.get("learning_rate"), "granted_steps": config.get("max_steps"),
            "charged_steps": searcher.charged.get(trial_id, config.get("max_steps", 0)),
            "error": str(result.error) if result.error else "", "checkpoint": "", "best_score": -math.inf,
        }
        if frame is not None and "score" in frame and len(frame):
            top = frame.loc[frame["score"].idxmax()]
            last = frame.iloc[-1]
            row.update(checkpoint=str(top.get("checkpoint_path", "") or ""), best_score=float(top["score"]),
                       best_step=int(top["step"]), val_loss=float(top["val_loss"]),
                       initial_val_loss=float(top["initial_val_loss"]), steps=int(last["step"]),
                       restarts=int(last["restarts"]), train_seconds=float(last["train_seconds"]),
                       timed_tokens=int(last["timed_tokens"]))
        else:
            row.update(steps=0, restarts=0, train_seconds=0.0, timed_tokens=0)
        run = runs.get(trial_id)  # searched after every trial ended: its tags are final
        tags = run.data.tags if run is not None else {}
        row.update(run_id=run.info.run_id if run is not None else "", dataset=tags.get("dataset", ""),
                   selection=tags.get("selection", ""), stopped=tags.get("stopped", ""))
        rows.append(row)
    return rows

