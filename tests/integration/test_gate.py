"""The evaluation gate and the model lifecycle on real MLflow (SQLite) with tiny models trained here.

One module-scoped registry holds the versions every test needs; each test sets the aliases it
starts from. The models are trained in-process on the real ingested datasets (Ray Train is
test_training's subject; here it would only multiply the time by ten) and registered with the
tags genloop's training writes: dataset and parent version are what the gate reads.
"""

from __future__ import annotations

import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from genloop.services.audit import AuditLog
from genloop.services.config import GenloopConfig
from genloop.services.gate import evaluate
from genloop.services.lifecycle import PromotionRefused, promote, roles, rollback
from genloop.services.registry import Registry
from genloop.training.dataset_store import resolve_dataset
from genloop.training.datasets import ingest
from genloop.training.errors import UserInputError
from genloop.training.replay import build_mix

pytestmark = pytest.mark.slow


def reset_aliases(config: GenloopConfig, champion: str | None, previous: str | None = None) -> None:
    registry = Registry(config)
    for alias, version in (("champion", champion), ("previous", previous)):
        if version is None:
            if registry.alias_version(alias) is not None:
                registry.client.delete_registered_model_alias(registry.name, alias)
        else:
            registry.client.set_registered_model_alias(registry.name, alias, version)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_cluster, register_model, train_tiny) -> tuple[GenloopConfig, dict[str, str]]:
    root = tmp_path_factory.mktemp("gate")
    config = GenloopConfig(home=root / "home")
    config.data.max_documents_per_source = 1500
    config.tokenizer.vocab_size = 1024
    config.evaluation.max_texts = 30  # scored by 2 models on 2 sets per evaluation: most of this file's time
    config.evaluation.prompts = 8
    config.evaluation.max_new_tokens = 24
    ingest(["builtin:python-docs"], "docs", config.data, config.datasets_dir)
    ingest(["builtin:python-code"], "code", config.data, config.datasets_dir)
    folders: dict[str, Path] = {}

    def trained(dataset: str, steps: int, base: str | None = None, seed: int = 0, lr: float = 1e-3,
                schedule: bool = False) -> str:
        texts = pq.read_table(resolve_dataset(config.datasets_dir, dataset).train_path).column("text").to_pylist()
        folder = train_tiny(texts, steps, base=folders[base] if base else None, vocab_size=config.tokenizer.vocab_size,
                            block_size=128, seed=seed, lr=lr, schedule=schedule)
        version = register_model(config, folder, tags={"dataset": dataset, "parent_version": base or ""})
        folders[version] = folder
        return version

    versions = {"champion": trained("docs:v1", 60)}
    versions["one_step"] = trained("docs:v1", 1)
    versions["better"] = trained("docs:v1", 40, base=versions["champion"], lr=5e-4)
    versions["rival"] = trained("docs:v1", 40, base=versions["champion"], seed=1, lr=5e-4)
    # The shift: a champion trained as the trainer does (warm-up, decay), warm-started on code with and
    # without docs replayed. With a constant rate the fixture forgets about as much either way.
    versions["docs_trained"] = trained("docs:v1", 150, schedule=True)
    for name, fraction in (("no_replay", 0.0), ("replay", 0.5)):
        mix = build_mix(config.datasets_dir, resolve_dataset(config.datasets_dir, "code:v1"),
                        [resolve_dataset(config.datasets_dir, "docs:v1")], fraction)
        versions[name] = trained(mix.spec, 100, base=versions["docs_trained"], lr=5e-4, schedule=True)
    return config, versions


def test_first_model_is_judged_by_bounds_alone(world):
    config, v = world
    reset_aliases(config, None)
    report = promote(config, v["champion"], actor="test")
    assert report.champion is None
    assert [rule.rule for rule in report.rules] == ["current.perplexity ≤ 1000"]
    assert roles(config).champion == v["champion"]


def test_worse_rejected_better_promoted_then_rolled_back(world):
    config, v = world
    reset_aliases(config, v["champion"])

    with pytest.raises(PromotionRefused) as refused:
        promote(config, v["one_step"], actor="test")
    failed = [rule for rule in refused.value.report.rules if not rule.passed]
    assert any(rule.rule.startswith("current.bits_per_byte improves") for rule in failed)
    assert roles(config).champion == v["champion"]
    assert Registry(config).resolve(v["one_step"]).tags["evaluation_verdict"] == "fail"

    report = promote(config, v["better"], actor="test")
    assert report.passed and report.champion.version == v["champion"]
    assert roles(config).champion == v["better"] and roles(config).previous == v["champion"]
    assert Registry(config).resolve(v["better"]).tags["evaluation_verdict"] == "pass"

    rollback(config, reason="bad answers in production", actor="test")
    assert roles(config).champion == v["champion"] and roles(config).previous == v["better"]

    history = AuditLog(config.state_db).history()
    assert [(e.action, e.to_version, e.outcome) for e in history[-3:]] == [
        ("promote", v["one_step"], "rejected"),
        ("promote", v["better"], "promoted"),
        ("rollback", v["champion"], "rolled-back"),
    ]
    assert history[-1].reason == "bad answers in production" and history[-2].report_id == report.id


def test_without_replay_the_warm_start_is_refused_with_replay_promoted(world):
    """The failure the loop had, and its fix: a warm start on the new domain alone learns it and
    forgets the old one, so the gate refuses it; the same warm start with old text replayed keeps the
    old domain and is promoted by the default policy."""
    config, v = world
    reset_aliases(config, v["docs_trained"])

    with pytest.raises(PromotionRefused) as refused:
        promote(config, v["no_replay"], actor="test")
    forgetful = refused.value.report
    rules = {rule.rule.split(" ")[0]: rule for rule in forgetful.rules}
    assert rules["current.bits_per_byte"].passed, rules["current.bits_per_byte"].reason
    assert not rules["reference.bits_per_byte"].passed, rules["reference.bits_per_byte"].reason
    assert forgetful.sets == {"current": ["code-mix:v1"], "reference": ["docs:v1"]}
    assert roles(config).champion == v["docs_trained"]

    replayed = promote(config, v["replay"], actor="test")
    assert replayed.passed, [(rule.rule, rule.reason) for rule in replayed.rules]
    assert replayed.sets == {"current": ["code-mix:v2"], "reference": ["docs:v1"]}
    assert roles(config).champion == v["replay"]
    replay = resolve_dataset(config.datasets_dir, "code-mix:v2").manifest["replay"]
    assert replay["versions"] == ["docs:v1"] and replay["fraction"] == 0.5 and replay["documents"] > 0


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text: list[str] = []
        self.rows = 0
        self.samples = 0

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and ("class", "sample") in attrs:
            self.samples += 1

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_saved_logged_and_renders(world):
    config, v = world
    reset_aliases(config, v["champion"])
    report = evaluate(config, v["better"])
    html_path = config.reports_dir / "evaluations" / f"{report.id}.html"
    assert (config.reports_dir / "evaluations" / f"{report.id}.json").exists()
    parser = _Collector()
    parser.feed(html_path.read_text(encoding="utf-8"))
    text = " ".join(parser.text)
    assert f"v{v['better']}" in text and f"v{v['champion']}" in text
    for rule in report.rules:
        assert rule.rule in text
    assert parser.samples >= 8
    registry = Registry(config)
    run_id = registry.resolve(v["better"]).run_id
    logged = {a.path for a in registry.client.list_artifacts(run_id, "evaluation")}
    assert f"evaluation/{report.id}.html" in logged


def test_bad_candidates_leave_the_champion_untouched(world, tmp_path: Path):
    config, v = world
    reset_aliases(config, v["champion"])
    with pytest.raises(UserInputError, match="unknown model version"):
        promote(config, "99")
    with pytest.raises(UserInputError, match="already the champion"):
        promote(config, v["champion"])
    with pytest.raises(UserInputError, match="nothing to compare"):
        evaluate(config, v["champion"])

    registry = Registry(config)
    weights = registry.local_path(registry.resolve(v["rival"])) / "model.safetensors"
    backup = tmp_path / "model.safetensors"
    shutil.copy(weights, backup)
    try:
        weights.write_bytes(b"\x00garbage, not a safetensors file")
        with pytest.raises(UserInputError, match="cannot load"):
            promote(config, v["rival"])
    finally:
        shutil.copy(backup, weights)
    assert roles(config).champion == v["champion"]

    mix = Path(config.datasets_dir) / "code-mix"
    hidden = tmp_path / "code-mix-hidden"
    shutil.move(mix, hidden)
    try:
        with pytest.raises(UserInputError, match="code-mix"):
            evaluate(config, v["no_replay"], against=v["better"])
    finally:
        shutil.move(hidden, mix)
    assert roles(config).champion == v["champion"]


def test_racing_promotions_one_wins_both_recorded_no_torn_reads(world):
    config, v = world
    reset_aliases(config, v["champion"], None)
    outcomes: dict[str, object] = {}
    seen: set[tuple[str | None, str | None]] = set()
    done = threading.Event()

    def contender(name: str) -> None:
        try:
            promote(config, v[name], actor=name)
            outcomes[name] = "promoted"
        except PromotionRefused as refused:
            outcomes[name] = str(refused)

    def reader() -> None:
        while not done.is_set():
            current = roles(config)
            seen.add((current.champion, current.previous))

    threads = [threading.Thread(target=contender, args=(n,)) for n in ("better", "rival")]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()

    assert sorted(o == "promoted" for o in outcomes.values()) == [False, True], outcomes
    winner = next(name for name, o in outcomes.items() if o == "promoted")
    loser = next(name for name, o in outcomes.items() if o != "promoted")
    assert "champion changed" in outcomes[loser]
    assert seen <= {(v["champion"], None), (v[winner], v["champion"])}, seen
    last_two = AuditLog(config.state_db).history()[-2:]
    assert {(e.to_version, e.outcome) for e in last_two} == {(v[winner], "promoted"), (v[loser], "conflict")}


def test_cli_exit_codes_and_tables(world):
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from genloop.services.cli import app

    config, v = world
    reset_aliases(config, v["champion"], v["better"])
    env = {"GENLOOP_HOME": str(config.home), "COLUMNS": "200"}

    def genloop(*args: str):  # in-process: the tables and outcomes
        return CliRunner().invoke(app, list(args), env=env)

    # One real process for what only a process shows: the exit code and a one-line error, no traceback.
    unknown = subprocess.run([sys.executable, "-m", "genloop.services.cli", "promote", "99"], capture_output=True,
                             text=True, env={**os.environ, **env}, timeout=300)
    assert unknown.returncode == 2 and "unknown model version" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    needs_reason = genloop("promote", v["better"], "--force")
    assert isinstance(needs_reason.exception, UserInputError) and "--reason" in str(needs_reason.exception)
    assert roles(config).champion == v["champion"]

    listing = genloop("models")
    assert listing.exit_code == 0, listing.output
    assert f"v{v['champion']}" in listing.output and "champion" in listing.output and "docs:v1" in listing.output

    forced = genloop("promote", v["rival"], "--force", "--reason", "hotfix for a bad answer")
    assert forced.exit_code == 0, forced.output
    assert roles(config).champion == v["rival"]
    history = genloop("models", "--history")
    assert "force-promote" in history.output and "hotfix" in history.output
