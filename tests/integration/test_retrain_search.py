"""A warm-start retrain's search on real Ray Tune, Ray Train and MLflow: trials as child runs, ASHA
stopping the weak, all of them within the budget, and the best checkpoint handed to the gate."""

from __future__ import annotations

import json
from pathlib import Path

from dataset_factory import write_dataset

from genloop.services.registry import Registry
from genloop.services.retrain import retrain
from genloop.services.search import TRIALS_ARTIFACT
from genloop.services.trials import PARENT_TAG


def test_a_retrain_searches_on_ray_tune_within_its_budget(genloop_config, ray_cluster, make_docs_dataset,
                                                          make_tiny_model, register_model):
    config = genloop_config
    config.scheduler.dataset, config.scheduler.min_new_documents = "live", 10
    config.scheduler.retrain_budget = 8  # steps: the champion was registered, not trained by genloop
    # The first trial barely moves (a peak learning rate of 1e-6); the others take a thousand times that,
    # which costs this tiny model more on the new texts than 1 step gains (measured: -0.4 %). Their
    # gate score at the first rung falls below the first trial's, and ASHA stops them there.
    config.train.learning_rate = 1e-6
    config.scheduler.search.learning_rate_range = (1e3, 1e3)
    config.scheduler.search.trials = 2  # each trial is a Ray Train run (~30 s here); what a third adds is unit-tested
    config.train.block_size, config.train.micro_batch_size, config.train.eval_batches = 32, 4, 2
    config.train.num_workers = 1
    config.evaluation.max_texts, config.evaluation.prompts, config.evaluation.max_new_tokens = 10, 2, 4
    unseen = [doc for doc in make_docs_dataset(config) if len(doc) >= 100]
    registry = Registry(config)
    champion = register_model(config, make_tiny_model(), tags={"dataset": "docs:v1", "parent_version": ""})
    registry.client.set_registered_model_alias(registry.name, "champion", champion)
    write_dataset(config.datasets_dir, "live", 1, train=unseen[:60], validation=unseen[60:120])

    result = retrain(config, "cron")

    assert result.outcome in ("promoted", "rejected"), result.detail
    version = registry.resolve(result.version)
    parent = registry.client.get_run(version.run_id)
    table = json.loads(Path(registry.client.download_artifacts(parent.info.run_id, TRIALS_ARTIFACT,
                                                               str(config.home))).read_text())
    trials = table["trials"]
    assert table["budget_steps"] == 8 and table["trial_steps"] == 4
    assert len(trials) == 2 and sum(t["charged_steps"] for t in trials) <= 8, json.dumps(trials, indent=1)
    assert [t["replay_fraction"] for t in trials] == [0.5, 0.25]  # scheduler.replay_fraction first
    assert trials[0]["learning_rate"] == 1e-6 * config.scheduler.retrain_learning_rate_scale  # a retrain's peak
    # The cost report charges every trial's steps, never more than the budget.
    tokens_per_step = 32 * 4
    assert parent.data.metrics["cost_tokens_seen"] == sum(t["charged_steps"] for t in trials) * tokens_per_step

    children = {run.info.run_id: run for run in registry.client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")}
    assert set(children) == {t["run_id"] for t in trials}
    # ASHA stopped the second trial at the first rung, and its workers stopped right there: it is
    # charged the one step it ran.
    assert (trials[0]["steps"], trials[0]["stopped"]) == (4, "")
    assert trials[1]["steps"] == 1 and trials[1]["stopped"].startswith("by ASHA at step 1:")
    assert [t["charged_steps"] for t in trials] == [4, 1]
    assert all(run.info.status == "FINISHED" for run in children.values())
    for trial in trials:  # each trial asked the gate's question at every evaluation, in its own run
        scores = registry.client.get_metric_history(trial["run_id"], "gate_score")
        assert {m.step for m in scores} == set(range(trial["steps"] + 1))
        assert trial["best_score"] == max(m.value for m in scores if m.step > 0)

    chosen = max(trials, key=lambda t: t["best_score"])
    assert children[chosen["run_id"]].data.tags["chosen"] == "true"
    assert version.tags["dataset"] == chosen["dataset"] == result.dataset
    assert parent.data.metrics["best_gate_score"] == chosen["best_score"]
    assert parent.data.tags["selection"].startswith(f"{chosen['trial']} (replay {chosen['replay_fraction']:g}")
