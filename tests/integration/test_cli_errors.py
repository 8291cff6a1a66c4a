"""Damage a user can do to genloop's input and state, through the real CLI: one line naming the file
and the problem, exit code 2, before any work starts; state that only its owner can read; and what
scripts read: ``--json``, the admin API's records alone on stdout."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from genloop.services.admin import build_admin_api
from genloop.services.cli import app
from genloop.services.config import GenloopConfig
from genloop.services.registry import Registry
from genloop.services.scheduler import GenloopScheduler
from genloop.serving.inference_log import InferenceLog, InferenceRecord


def genloop(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GENLOOP_HOME": str(cwd / "home"), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "genloop.services.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert len(lines[0]) < 400


def test_bad_names_and_damaged_files_are_one_line_and_exit_2(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    one_error_line(genloop(tmp_path, "data", "list", "../../etc"), "invalid dataset name")
    one_error_line(genloop(tmp_path, "data", "list", "absent"), "no dataset named 'absent'")
    one_error_line(genloop(tmp_path, "train"), "Missing option '--dataset'", "genloop.services.cli train --help")
    one_error_line(genloop(tmp_path, "serve", "--port", "70000"), "--port 70000: Input should be less than")
    one_error_line(genloop(tmp_path, "data", "ingest", "builtin:python-docs", "--name", "n" * 5000),
                   "invalid dataset name", "(5000 chars)")
    (tmp_path / "tuned.yaml").write_text("train:\n  learning_rat: 0.002\n")
    one_error_line(genloop(tmp_path, "train", "-d", "docs", "--settings", "tuned.yaml"),
                   "tuned.yaml", "train.learning_rat: unknown key")
    one_error_line(genloop(tmp_path, "tune", "-d", "docs", "--preset", "huge"), "unknown preset huge")
    one_error_line(genloop(tmp_path, "tune", "-d", "docs", "--output", "."), "--output .: a folder")
    (tmp_path / "genloop.yaml").write_bytes(b"data:\n  max_documents_per_source: \xff\xfe\n")
    one_error_line(genloop(tmp_path, "config", "show"), "genloop.yaml: not UTF-8")
    (tmp_path / "genloop.yaml").unlink()
    for name in ("scheduler.db", "genloop.db", "mlflow.db"):
        (home / name).write_bytes(b"this is not a database, but it is long enough to be read as one" * 20)
        one_error_line(genloop(tmp_path, "models"), f"{home / name}: not a SQLite database")
        (home / name).unlink()


def test_a_truncated_weights_file_is_named_before_serving_or_generating(tmp_path: Path, make_tiny_model,
                                                                          register_model):
    config = GenloopConfig(home=tmp_path / "home")
    version = register_model(config, make_tiny_model())
    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", version)
    weights = registry.local_path(registry.resolve(version)) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    one_error_line(genloop(tmp_path, "generate", "-i", str(prompts), "-o", str(tmp_path / "out.jsonl")),
                   "model.safetensors: damaged weights file")
    assert not (tmp_path / "out.jsonl").exists()


def test_state_created_by_the_cli_is_private(tmp_path: Path):
    assert genloop(tmp_path, "models").returncode == 0
    home = tmp_path / "home"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    created = [path for path in home.rglob("*") if path.is_file()]
    assert created and all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in created), \
        {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in created}


def test_json_is_what_the_admin_api_serves_alone_on_stdout(tmp_path: Path, monkeypatch, make_tiny_model,
                                                          register_model, make_docs_dataset):
    config = GenloopConfig(home=tmp_path / "home")
    make_docs_dataset(config)
    version = register_model(config, make_tiny_model(), tags={"dataset": "docs:v1"})
    log = InferenceLog(config.inference_log_dir)
    for i in range(5):
        log.append(InferenceRecord(request_id=f"r{i}", route="completions", model_version=version, status=200,
                                   prompt=f"How do I open file number {i} for reading?"))
    log.close()
    monkeypatch.chdir(tmp_path)
    for name, value in (("HOME", config.home), ("EVALUATION__MAX_TEXTS", 10), ("EVALUATION__PROMPTS", 2),
                        ("EVALUATION__MAX_NEW_TOKENS", 8)):
        monkeypatch.setenv(f"GENLOOP_{name}", str(value))
    admin = TestClient(build_admin_api(config, GenloopScheduler(config), lambda: None, threading.Event(), {}))

    def genloop_json(*args: str):  # in-process; -v: no run log file outliving the test
        result = CliRunner().invoke(app, ["-v", *args, "--json"])
        logging.getLogger("genloop").setLevel(logging.NOTSET)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return result.exit_code, json.loads(result.stdout)  # fails on anything but the JSON

    code, report = genloop_json("evaluate", version)  # the first model: judged by the bounds alone
    assert code == (0 if report["passed"] else 1)  # the gate's exit code, --json or not
    assert report["candidate"]["version"] == version and report["champion"] is None and report["rules"]
    html = Path(report.pop("report"))
    assert html.is_file() and json.loads(html.with_suffix(".json").read_text()) == report  # the gate's own record

    registry = Registry(config)
    registry.client.set_registered_model_alias(registry.name, "champion", version)
    code, models = genloop_json("models")
    assert code == 0 and models == admin.get("/admin/models").json() and models[0]["aliases"] == ["champion"]

    code, drift = genloop_json("drift", "--window", "1h")
    assert code == 0 and drift["verdict"] == "insufficient data" and drift["current_samples"] == 5
    assert Path(drift.pop("report")) == config.reports_dir / "drift" / f"{drift['id']}.html"
    served = admin.get("/admin/drift").json()
    assert served.pop("report") == f"/admin/reports/drift/{drift['id']}.html" and served == drift
