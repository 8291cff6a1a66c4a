"""The admin API in-process over real HTTP semantics (ASGI), on a real registry, audit log and job store.

What needs no model or Ray: tokens (401, 403, names in the audit log), the refusals (unknown
version 404, a forced promotion without a reason 400, a second retrain 409, a report outside the
reports folder 404), the job history's queued run with its stages. `tests/e2e/test_up.py` runs the
same routes against a real `genloop up` with a champion serving.
"""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from genloop.services.admin import admin_tokens, build_admin_api, is_loopback
from genloop.services.audit import AuditLog
from genloop.services.scheduler import GenloopScheduler, JobHistory


def test_tokens_are_named_and_bare_ones_are_admin():
    assert admin_tokens("ops:abc, ci:d:e,plain") == {"abc": "ops", "e": "ci:d", "plain": "admin"}
    assert admin_tokens("") == {}
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


@pytest.fixture
def admin(genloop_config):
    scheduler = GenloopScheduler(genloop_config)  # not started: run_now only queues in the job store
    moved, stopping = [], threading.Event()
    api = build_admin_api(genloop_config, scheduler, lambda: moved.append(1), stopping, {"s3cret": "ops"})
    with TestClient(api) as client:
        yield client, scheduler, moved, stopping


def test_tokens_are_checked_before_anything_else(admin):
    client, _, _, _ = admin
    assert client.get("/admin/jobs").status_code == 401
    assert client.get("/admin/jobs").headers["www-authenticate"] == "Bearer"
    denied = client.get("/admin/jobs", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert client.post("/admin/rollback", headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
    assert client.get("/admin/jobs", headers={"Authorization": "Bearer s3cret"}).json() == []
    assert "/admin/promote/{version}" in client.get("/openapi.json").json()["paths"]


def test_refusals_are_clear_and_change_nothing(admin, genloop_config):
    client, scheduler, moved, stopping = admin
    auth = {"Authorization": "Bearer s3cret"}
    unknown = client.post("/admin/promote/7", headers=auth, json={"force": True, "reason": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "version"
    assert client.post("/admin/promote/7", headers=auth, json={"force": True}).status_code == 400
    assert client.post("/admin/promote/7", headers=auth, json={"forse": True}).status_code == 400
    assert client.post("/admin/rollback", headers=auth).status_code == 400  # no previous champion
    assert client.get("/admin/drift", headers=auth).status_code == 404
    assert client.get("/admin/jobs/99", headers=auth).status_code == 404
    (genloop_config.home / "secret.json").parent.mkdir(parents=True, exist_ok=True)
    (genloop_config.home / "secret.json").write_text("{}")
    assert client.get("/admin/reports/../secret.json", headers=auth).status_code == 404
    assert client.get("/admin/reports/%2E%2E/secret.json", headers=auth).status_code == 404
    assert moved == [] and AuditLog(genloop_config.state_db).history() == []

    accepted = client.post("/admin/retrain", headers=auth, json={"reason": "new data"})
    assert accepted.status_code == 202 and accepted.headers["location"] == accepted.json()["url"]
    run_id = accepted.json()["id"]
    busy = client.post("/admin/retrain", headers=auth)
    assert busy.status_code == 409 and busy.json()["running"] == run_id
    job = client.get(f"/admin/jobs/{run_id}", headers=auth).json()
    assert (job["job"], job["reason"], job["outcome"], job["stage"]) == ("retrain", "manual", "queued", None)
    [entry] = AuditLog(genloop_config.state_db).history()
    assert (entry.actor, entry.action, entry.outcome) == ("ops", "retrain", "queued")
    assert f"job run {run_id}: new data" == entry.reason

    stopping.set()
    assert client.post("/admin/rollback", headers=auth).status_code == 503
    assert client.get("/admin/jobs", headers=auth).status_code == 200  # reading goes on while stopping


def test_a_queued_run_keeps_its_id_through_its_stages_and_a_restart_closes_it(genloop_config):
    history = JobHistory(genloop_config.scheduler_db)
    run_id = history.queued("retrain", "manual")
    assert history.active("retrain").id == run_id
    assert history.started("retrain", "manual", run_id) == run_id  # the queued row, now running
    history.stage(run_id, "train", "docs:v1", mlflow_run_id="abc")
    assert history.finished(run_id, "promoted", "v2")
    assert not history.finished(run_id, "failed", "late")  # an ended run stays as it ended
    run, stages = history.get(run_id)
    assert run.outcome == "promoted" and [(s.stage, s.mlflow_run_id) for s in stages] == [("train", "abc")]
    assert history.active("retrain") is None

    left = history.queued("retrain", "manual")
    with GenloopScheduler(genloop_config).exclusive():  # the next lock holder closes what a dead one left
        pass
    assert history.get(left)[0].outcome == "failed" and "interrupted" in history.get(left)[0].detail
