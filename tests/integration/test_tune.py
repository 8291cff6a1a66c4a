"""``genloop tune`` on real Ray Tune, Ray Train and MLflow: the config's settings as the first trial,
ASHA stopping a hopeless one, a child run per trial, and the best settings in a file
``genloop train --settings`` reads."""

from __future__ import annotations

import json

import pytest
import yaml
from rich.console import Console

from genloop.services.config import load_train_settings
from genloop.services.registry import Registry
from genloop.services.trials import PARENT_TAG
from genloop.services.tuning import TUNED, trials_table, tune_training

pytestmark = pytest.mark.slow


def test_tune_searches_the_training_settings_and_writes_the_best(genloop_config, ray_cluster, make_docs_dataset,
                                                                 tmp_path):
    config = genloop_config
    make_docs_dataset(config)
    config.tokenizer.vocab_size = 512
    config.train.block_size, config.train.eval_batches, config.train.num_workers = 32, 2, 1
    config.train.max_steps, config.train.warmup_steps, config.train.micro_batch_size = 4, 0, 4
    # The second trial learns at 1000× the first's rate, which wrecks a fresh model in one step: its
    # validation loss at the first rung is far behind the first trial's, and ASHA stops it there.
    config.tuning.trials, config.tuning.learning_rate_range = 2, (1e3, 1e3)
    config.tuning.micro_batch_sizes, config.tuning.weight_decays, config.tuning.warmup_fractions = [2], [0.05], [0.25]
    config.tuning.presets = ["tiny-llama"]  # besides train.preset (tiny): a second initial model, one tokenizer

    result = tune_training(config, "docs", show_progress=False, output=tmp_path / "tuned.yaml")

    first, second = result.trials
    # The first trial is the config's own settings, as they are.
    assert (first["learning_rate"], first["micro_batch_size"], first["weight_decay"], first["preset"]) \
        == (1e-3, 4, 0.1, "tiny")
    assert (first["steps"], first["stopped"]) == (4, "")
    assert second["learning_rate"] == pytest.approx(1.0) and second["micro_batch_size"] == 2
    assert second["weight_decay"] == 0.05 and second["preset"] in ("tiny", "tiny-llama")
    assert second["steps"] == 1 and second["stopped"].startswith("by ASHA at step 1:"), second
    assert result.best is first

    registry = Registry(config)
    client = registry.client
    children = {run.info.run_id: run for run in client.search_runs(
        [registry.experiment_id()], filter_string=f"tags.`{PARENT_TAG}` = '{result.run_id}'")}
    assert set(children) == {first["run_id"], second["run_id"]}
    for trial in result.trials:  # each trial's run holds its own settings and validation curve
        params = children[trial["run_id"]].data.params
        assert params["preset"] == trial["preset"] and float(params["learning_rate"]) == trial["learning_rate"]
        losses = client.get_metric_history(trial["run_id"], "val_loss")
        assert [m.step for m in losses] == list(range(trial["steps"] + 1))
        assert [m.step for m in losses] == [step for step, _ in trial["curve"]]
        assert [m.value for m in losses] == pytest.approx([loss for _, loss in trial["curve"]])
    assert children[first["run_id"]].data.tags["chosen"] == "true"

    # The best settings: a file `genloop train --settings` reads, the same under reports/ and on the run.
    written = (tmp_path / "tuned.yaml").read_text()
    assert written == (config.reports_dir / "tuning" / f"{result.run_id[:8]}.yaml").read_text()
    assert set(yaml.safe_load(written)["train"]) == set(TUNED)
    tuned = load_train_settings(tmp_path / "tuned.yaml", config.train)
    assert (tuned.learning_rate, tuned.micro_batch_size, tuned.preset, tuned.max_steps) == (1e-3, 4, "tiny", 4)
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(result.report.read_text())
    assert report["best"] == first["trial"] and len(report["trials"]) == 2
    assert report["cost"]["tokens_seen"] == (4 * 4 + 1 * 2) * 32
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["best.learning_rate"] == "0.001"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(first["val_loss"])
    assert {a.path for a in client.list_artifacts(result.run_id, "tuning")} == {
        f"tuning/{result.run_id[:8]}.{kind}" for kind in ("json", "png", "yaml")}
    # No model is registered: a tune's product is settings.
    assert not client.search_model_versions(f"name = '{registry.name}'")

    shown = Console(width=160, record=True)
    shown.print(trials_table(result))
    text = shown.export_text()
    assert "best" in text and "by ASHA at step 1" in text
