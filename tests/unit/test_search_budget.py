"""The retrain search's plan and budget ledger (``services.search``), without Ray: the budget must
hold whatever order trials end in and however Tune stops them."""

from __future__ import annotations

import random

import pytest
from ray.tune.search import Searcher

from genloop.services.schedule import RetrainSearchConfig
from genloop.services.search import BudgetedSearch, TrialPlan, trial_plans


def test_the_first_trial_is_todays_defaults_and_the_others_take_the_other_shares():
    plans = trial_plans(RetrainSearchConfig(trials=5), replay_fraction=0.25, learning_rate=1e-3, seed=0)
    assert plans[0] == TrialPlan(0.25, 1e-3)
    assert [p.replay_fraction for p in plans[1:]] == [0.5, 0.75, 0.5, 0.75]
    assert all(0.25e-3 <= p.learning_rate <= 1e-3 for p in plans[1:])
    assert len({p.learning_rate for p in plans[1:]}) == 4  # sampled, not one value
    assert plans == trial_plans(RetrainSearchConfig(trials=5), 0.25, 1e-3, seed=0)  # seeded
    assert plans != trial_plans(RetrainSearchConfig(trials=5), 0.25, 1e-3, seed=1)
    assert trial_plans(RetrainSearchConfig(trials=1), 0.25, 1e-3, seed=0) == [TrialPlan(0.25, 1e-3)]


def test_a_trial_stopped_early_gives_its_unspent_steps_to_the_next():
    search = BudgetedSearch([TrialPlan(f, 1e-3) for f in (0.25, 0.5, 0.75)], budget_steps=100, trial_steps=50,
                            eval_every=10)
    assert search.suggest("a")["max_steps"] == 50
    assert search.suggest("b")["max_steps"] == 50
    assert search.suggest("c") is None  # nothing left while a and b run: wait, they may give some back
    search.on_trial_complete("b", {"step": 20})  # stopped by ASHA at step 20, where its workers stopped
    third = search.suggest("c")
    assert third == {"replay_fraction": 0.75, "learning_rate": 1e-3, "max_steps": 30}
    search.on_trial_complete("a", {"step": 50})
    search.on_trial_complete("c", error=True)  # a failed trial is charged all it was granted
    assert search.charged == {"a": 50, "b": 20, "c": 30}
    assert search.suggest("d") == Searcher.FINISHED


def test_no_trial_starts_that_the_budget_cannot_evaluate_once():
    search = BudgetedSearch([TrialPlan(0.25, 1e-3), TrialPlan(0.5, 1e-3)], budget_steps=55, trial_steps=50,
                            eval_every=10)
    assert search.suggest("a")["max_steps"] == 50
    search.on_trial_complete("a", {"step": 50})
    assert search.suggest("b") == Searcher.FINISHED  # 5 steps left, fewer than one evaluation interval


@pytest.mark.parametrize("seed", range(20))
def test_the_trials_together_never_pass_the_budget(seed):
    rng = random.Random(seed)
    budget, eval_every = rng.randint(20, 200), rng.randint(1, 10)
    search = BudgetedSearch([TrialPlan(0.5, 1e-3)] * 8, budget, rng.randint(eval_every, budget), eval_every)
    running: dict[str, int] = {}
    for n in range(200):
        if running and (rng.random() < 0.5 or len(running) >= 3):
            trial, granted = running.popitem()
            stopped = rng.choice([granted, rng.randint(0, granted), None])
            search.on_trial_complete(trial, None if stopped is None else {"step": stopped}, error=stopped is None)
            continue
        suggestion = search.suggest(str(n))
        if suggestion == Searcher.FINISHED:
            break
        if suggestion is not None:
            running[str(n)] = suggestion["max_steps"]
    for trial, granted in running.items():
        search.on_trial_complete(trial, {"step": granted})
    assert sum(search.charged.values()) <= budget
