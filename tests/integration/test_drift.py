"""`genloop drift` on a real inference log and a real champion: Evidently decides, the gauges follow."""

from __future__ import annotations

import random
import sysconfig
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from genloop.services.drift_check import latest_drift, run_drift_check
from genloop.services.registry import Registry
from genloop.serving.inference_log import InferenceLog, InferenceRecord

WORDS = (8, 48)


def _prefixes(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(t.split()[: rng.randint(*WORDS)]) for t in texts if len(t.split()) >= WORDS[0]]


def _code() -> list[str]:
    chunks = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        chunks += ["\n".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]
    return [c for c in chunks if len(c.split()) >= 8]


@pytest.fixture
def champion_home(genloop_config, make_tiny_model, register_model, make_docs_dataset, tmp_path):
    """A champion trained (tagged) on half of the pydoc paragraphs; the other half plays live traffic."""
    config = genloop_config
    config.monitoring.drift_max_samples = 300
    live_docs = make_docs_dataset(config)
    version = register_model(config, make_tiny_model())
    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", version)
    registry.client.set_model_version_tag(registry.name, version, "dataset", "docs:v1")
    return config, live_docs


def _log(config, prompts: list[str]) -> None:
    log = InferenceLog(config.inference_log_dir)
    for i, prompt in enumerate(prompts):
        log.append(InferenceRecord(request_id=f"r{i}", route="completions", model_version="1", status=200,
                                   prompt=prompt))
    log.append(InferenceRecord(request_id="old", route="completions", model_version="1", status=200,
                               prompt="outside the window", time=datetime.now(UTC) - timedelta(days=3)))
    log.close()


def _gauge(name: str, feature: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"feature": feature})


def test_same_domain_is_not_drift_and_code_is(champion_home):
    config, live_docs = champion_home
    _log(config, _prefixes(live_docs, seed=1)[:300])
    same = run_drift_check(config, timedelta(hours=1))
    assert same.verdict == "no drift", same.features
    assert same.current_samples == 300 and same.reference_samples == 300
    assert Path(config.reports_dir / "drift" / f"{same.id}.html").stat().st_size > 10_000
    assert _gauge("genloop_drift_detected", "dataset") == 0
    assert latest_drift(config).id == same.id

    _log(config, _prefixes(_code(), seed=2)[:300])
    shifted = run_drift_check(config, timedelta(hours=1))  # the window now holds docs and code, half each
    assert shifted.verdict == "drift"
    drifted = set(shifted.drifted_features)
    assert {"prompt", "non_letter_percent"} <= drifted, shifted.features
    assert _gauge("genloop_drift_detected", "dataset") == 1
    assert _gauge("genloop_drift_detected", "non_letter_percent") == 1
    assert _gauge("genloop_drift_score", "surprise") is not None
    runs = Registry(config).client.search_runs([Registry(config).experiment_id()], "tags.kind = 'drift'")
    assert {r.data.tags["verdict"] for r in runs} == {"drift", "no drift"}


def test_too_few_prompts_is_insufficient_data_not_drift(champion_home):
    config, live_docs = champion_home
    _log(config, _prefixes(live_docs, seed=1)[:20])
    result = run_drift_check(config, timedelta(hours=1))
    assert result.verdict == "insufficient data" and result.current_samples == 20 and not result.features
    assert (config.reports_dir / "drift" / f"{result.id}.json").exists()
