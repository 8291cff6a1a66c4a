"""The alert rules in deploy/ are what ``monitoring.alerts`` generates, valid, and every alert fires when
(and only when) its unit tests say so — checked by the real `promtool` of the Prometheus Debian package;
every alert has a runbook section."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from genloop.monitoring import alerts
from genloop.monitoring.alerts import AlertSettings, SLOSettings

PROMETHEUS = Path(__file__).parents[2] / "deploy" / "prometheus"
RUNBOOK = Path(__file__).parents[2] / alerts.RUNBOOK


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: `make test` installs the prometheus package (apt-get install prometheus)")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def _alerts() -> list[dict]:
    return [rule for group in alerts.rules()["groups"] for rule in group["rules"] if "alert" in rule]


def test_alert_rules_are_generated_valid_and_their_unit_tests_pass():
    assert (PROMETHEUS / "alerts.yml").read_text(encoding="utf-8") == alerts.render(), \
        "stale alerts.yml: run `python -m genloop.monitoring.alerts` and commit the result"
    count = sum(len(group["rules"]) for group in alerts.rules()["groups"])
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0 and f"SUCCESS: {count} rules found" in checked.stdout, \
        checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_unit_tests_that_fire_it_and_that_do_not():
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    names = {rule["alert"] for rule in _alerts()}
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == names
    assert {case["alertname"] for case in cases if not case["exp_alerts"]} == names


def test_every_alert_links_its_own_runbook_section():
    sections = re.findall(r"^## (\S+)$", RUNBOOK.read_text(encoding="utf-8"), flags=re.MULTILINE)
    names = [rule["alert"] for rule in _alerts()]
    assert sorted(sections) == sorted(names)  # a section per alert, none for an alert that is gone
    for rule in _alerts():  # GitHub's anchor of a one-word heading: the word, lower-cased
        assert rule["annotations"]["runbook_url"] == f"{alerts.RUNBOOK}#{rule['alert'].lower()}"


def test_the_slo_settings_set_the_burn_rate_thresholds():
    strict = alerts.render(AlertSettings(slo=SLOSettings(availability=0.999, ttft_seconds=1, ttft_target=0.95),
                                         runbook="https://runbooks.example/genloop.md"))
    assert "ratio_rate1h > 14.4 * 0.001" in strict and "ratio_rate6h > 6 * 0.001" in strict
    assert 'le="1.0"' in strict and "ratio_rate3d > 1 * 0.05" in strict
    assert "runbook_url: https://runbooks.example/genloop.md#genlooptargetdown" in strict
    with pytest.raises(ValidationError, match="bucket boundary"):
        SLOSettings(ttft_seconds=3)  # no bucket ends there: the share of slow first tokens could not be counted


def test_prometheus_config_is_valid():
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
