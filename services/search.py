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
stop reaches its workers at the evaluation it judged (``services.trials``). So all trials together never
spend more than ``retrain_budget`` of the lineage's from-scratch compute, side by side on a cluster
or one at a time here. The trials start in order: today's defaults first, then the other replay
shares in turn with learning rates sampled log-uniformly (Tune's own ``loguniform``).

The candidate is the best checkpoint of all trials by gate score; the retrain's MLflow run holds it,
the cost of all trials and the trials' table (``search/trials.json``).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import Searcher

from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.services.schedule import RetrainSearchConfig
from genloop.services.selection import Selection
from genloop.services.training_run import Prepared, TrainingRun, check_size, open_run, prepare, register
from genloop.services.trials import TrialContext, best_trial, run_trial, run_trials
from genloop.training.config import TrainConfig
from genloop.training.cost import cost_report
from genloop.training.dataset_store import DatasetVersion
from genloop.training.errors import UserInputError
from genloop.training.replay import build_mix

logger = logging.getLogger(__name__)

TRIALS_ARTIFACT = "search/trials.json"


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


def trial_settings(settings: TrainConfig, learning_rate: float, max_steps: int) -> TrainConfig:
    """A trial's schedule: warm-up and decay over its own steps, evaluations on the search's grid."""
    return settings.model_copy(update={"learning_rate": learning_rate, "max_steps": max_steps,
                                       "warmup_steps": min(settings.warmup_steps, max_steps // 10)})


def _run_trial(trial: dict[str, Any], context: TrialContext, prepared: Prepared,
               mixes: dict[float, tuple[str, str]]) -> None:
    """One trial: the mix of its replay share (``mixes``: share → train split, dataset spec) at its
    learning rate and steps."""
    train_path, spec = mixes[trial["replay_fraction"]]
    run_trial(context, prepared, train_path, trial_settings(prepared.settings, trial["learning_rate"],
                                                            trial["max_steps"]),
              params={"replay_fraction": str(trial["replay_fraction"]),
                      "learning_rate": f"{trial['learning_rate']:.3g}", "max_steps": str(trial["max_steps"]),
                      "dataset": spec},
              tags={"dataset": spec})


def _describe(config: dict) -> str:
    return f"replay {config['replay_fraction']:g}, lr {config['learning_rate']:.2g}"


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
        trials, wall = run_trials(
            _run_trial, registry=registry, run_id=run_id, storage_path=config.ray_storage_path,
            name=f"search-{run_id[:8]}", show_progress=show_progress, unit="budget steps", total_steps=budget,
            describe=_describe, score_name="gate score", trial_steps=trial_steps, eval_every=eval_every,
            reduction_factor=search.reduction_factor, concurrent_trials=search.concurrent_trials,
            num_samples=len(plans), search_alg=searcher, prepared=prepared,
            mixes={f: (str(m.train_path), m.spec) for f, m in mixes.items()})
        for row in trials:  # what each trial was granted and charged of the budget
            row["granted_steps"] = row.pop("max_steps", None)
            row["charged_steps"] = searcher.charged.get(row["trial"], row["granted_steps"] or 0)
        best = best_trial(trials, "search")
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
        result = replace(register(registry, prepared, run_id, best["checkpoint"], metrics, cost),
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
