"""The command line in-process (typer's runner), where no model, registry or Ray is needed: what people
and scripts read from it. Exit codes and one-line errors of a real process: tests/integration/test_cli_errors.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from genloop.services.cli import app
from genloop.services.config import GenloopConfig, load_config


@pytest.fixture
def genloop(tmp_path: Path, monkeypatch):
    """Run a genloop command in-process, from an empty folder, with its state in ``tmp_path/home``.

    ``-v``: no run log file, whose handlers would outlive the test in this process.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GENLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "80")

    def run(*args: str):
        return CliRunner().invoke(app, ["-v", *args])

    yield run
    logging.getLogger("genloop").setLevel(logging.NOTSET)


def test_version_is_the_installed_one():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"genloop {version('genloop')}\n"


def test_config_show_is_plain_yaml_with_secrets_masked(genloop, monkeypatch):
    long_name = "served-model-" + "x" * 150
    monkeypatch.setenv("GENLOOP_TRACKING__TRACKING_URI", "https://alice:tracking-pw@mlflow.example:5000/?token=t0k")
    monkeypatch.setenv("GENLOOP_STATE_DB_URL", "postgresql+psycopg://genloop:db-pw@db.example:5432/genloop")
    monkeypatch.setenv("GENLOOP_SERVING__MODEL_NAME", long_name)
    monkeypatch.setenv("GENLOOP_TRAIN__PRESET", "[small] and [bold]not markup[/bold]")
    result = genloop("config", "show")
    assert result.exit_code == 0, result.output
    expected = load_config().model_dump(mode="json")
    expected["tracking"]["tracking_uri"] = "https://alice:***@mlflow.example:5000/?token=***"
    expected["state_db_url"] = "postgresql+psycopg://genloop:***@db.example:5432/genloop"
    assert yaml.safe_load(result.stdout) == expected  # the masks, and nothing else changed
    assert not any(secret in result.stdout for secret in ("tracking-pw", "t0k", "db-pw"))
    assert f"  model_name: {long_name}\n" in result.stdout  # one line, however long
    assert expected["train"]["preset"] == "[small] and [bold]not markup[/bold]"


def test_train_help_lists_every_preset():
    from genloop.training.models import PRESETS

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert f" {name}: " in result.stdout and "parameters" in result.stdout


def test_data_list_and_scheduler_status_as_json_and_tables(genloop, tmp_path, make_docs_dataset):
    from genloop.services.scheduler import JobHistory

    config = GenloopConfig(home=tmp_path / "home")
    make_docs_dataset(config)
    listing = genloop("data", "list", "docs", "--json")
    assert listing.exit_code == 0, listing.output
    assert json.loads(listing.stdout) == [{
        "name": "docs", "version": 1, "spec": "docs:v1", "created_at": "now", "counts": {}, "content_hash": "docs",
        "extends": None, "path": str(Path(config.datasets_dir) / "docs" / "v1")}]
    assert genloop("data", "list", "docs").stdout.startswith("v1  now")

    history = JobHistory(config.scheduler_db)
    history.finished(history.started("drift", "manual"), "no drift", "3 features, none drifted")
    status = genloop("scheduler", "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == {
        "jobs": [{"job": "drift", "runs": {"no drift": 1}, "last_run": history.recent()[0].started_at,
                  "next_run": None}],
        "runs": [run.model_dump() for run in history.recent()]}
    table = genloop("scheduler", "status")
    assert table.exit_code == 0 and "no drift" in table.stdout and "3 features" in table.stdout


@pytest.mark.parametrize(("level", "console", "in_file", "not_in_file"), [
    ("WARNING", ["warning: our warning"], ["our info", "their info"], ["our debug", "their debug"]),
    ("DEBUG", ["debug: our debug", "info: our info", "warning: our warning"], ["our debug", "our info"],
     ["their debug"]),
    ("ERROR", [], ["our info", "our warning"], ["our debug"]),
])
def test_log_level_sets_what_genloop_shows_and_the_file_keeps_info(tmp_path, level, console, in_file, not_in_file):
    # A process of its own: start_log takes over the process's logging.
    script = """
import logging, sys
from genloop.services.console import start_log
path = start_log(sys.argv[1], "test", level=getattr(logging, sys.argv[2]))
ours, theirs = logging.getLogger("genloop.services.test"), logging.getLogger("mlflow.store")
theirs.setLevel(logging.DEBUG)  # as Ray Data does to its own logger
ours.debug("our debug"), ours.info("our info"), ours.warning("our warning")
theirs.debug("their debug"), theirs.info("their info"), theirs.error("their error"), theirs.error("their error")
print(path)
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), level], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert result.stderr.splitlines() == [*console, f"mlflow.store reported an error: their error (details in {path})"]
    logged = Path(path).read_text()
    assert all(text in logged for text in in_file) and not any(text in logged for text in not_in_file), logged


def test_what_a_library_prints_during_a_search_goes_to_the_log_and_the_bar_stays(tmp_path):
    # Ray Tune prints its experiment's header with print() at any verbosity; the search's own bar,
    # bound to stdout before, stays on the console. A process of its own: start_log takes over logging.
    script = """
import sys
from genloop.services.console import prints_to_log, start_log
from genloop.services.trials import progress_bar
path = start_log(sys.argv[1], "test")
bar = progress_bar(True, "steps")
with prints_to_log():
    print("Configuration for experiment")
    bar.console.print("search bar")
print(path)
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    *shown, path = result.stdout.strip().splitlines()
    assert shown == ["search bar"]
    assert "Configuration for experiment" in Path(path).read_text()
