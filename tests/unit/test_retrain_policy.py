"""The scheduler's rules that need no model: the off-peak window, the retrain budget, the weighted gate."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from genloop.services.config import ConfigError, GateConfig, load_config
from genloop.services.gate import apply_policy
from genloop.services.schedule import SchedulerConfig, window_wait
from genloop.training.evaluation import SetMetrics


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, 2, hour, minute, tzinfo=UTC)


def test_window_says_when_it_opens():
    assert window_wait(None, at(12)) is None
    assert window_wait("01:00-05:00", at(3)) is None
    assert window_wait("01:00-05:00", at(0, 30)) == at(1)
    assert window_wait("01:00-05:00", at(5)) == datetime(2026, 12, 3, 1, tzinfo=UTC)  # the end is outside
    assert window_wait("22:00-04:00", at(23)) is None and window_wait("22:00-04:00", at(2)) is None  # wraps
    assert window_wait("22:00-04:00", at(12)) == at(22)


@pytest.mark.parametrize("bad", ["1-5", "01:00-01:00", "25:00-02:00", "01:00"])
def test_a_bad_window_names_the_setting(tmp_path, bad):
    file = tmp_path / "genloop.yaml"
    file.write_text(f"scheduler:\n  window: '{bad}'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="scheduler.window"):
        load_config(file)


def test_budget_is_a_share_of_the_initial_compute_or_a_number_of_steps():
    assert SchedulerConfig(retrain_budget=0.2).budget_steps(initial_tokens=100 * 4096, tokens_per_step=4096) == 20
    assert SchedulerConfig(retrain_budget=0.2).budget_steps(initial_tokens=100 * 4096, tokens_per_step=1024) == 80
    assert SchedulerConfig(retrain_budget=50).budget_steps(initial_tokens=0, tokens_per_step=4096) == 50
    with pytest.raises(ValueError, match="whole number"):
        SchedulerConfig(retrain_budget=2.5)


def metrics(candidate: float, champion: float) -> dict[str, SetMetrics]:
    def one(bpb: float) -> SetMetrics:
        return SetMetrics(perplexity=10, bits_per_byte=bpb, bleu=0, chrf=0, rouge_l=0, ms_per_token=1, texts=1,
                          tokens=1, prompts=0)

    return {"candidate": one(candidate), "champion": one(champion)}


def test_gate_weighs_the_sets_by_traffic():
    policy = GateConfig()
    sets = {"current": metrics(2.0, 4.0), "reference": metrics(3.03, 3.0), "live": metrics(2.0, 4.0)}
    rules = apply_policy(policy, sets, {"current": 0.9, "reference": 0.1})
    assert [rule.rule for rule in rules] == [
        "traffic-weighted bits_per_byte (current 90%, reference 10%) improves by ≥ 1.0%",
        "reference.bits_per_byte regresses by ≤ 2.0%", "live.bits_per_byte regresses by ≤ 2.0%",
        "current.perplexity ≤ 1000"]
    assert all(rule.passed for rule in rules)
    # Traffic still on the old domain: the same gains weigh differently, and a loss there counts.
    sets["reference"] = metrics(3.05, 3.0)
    weighted = apply_policy(policy, sets, {"current": 0.01, "reference": 0.99})[0]
    assert not weighted.passed and "→ -1.15%" in weighted.reason
    assert apply_policy(policy, sets)[0].rule == "current.bits_per_byte improves by ≥ 1.0%"  # no traffic
