"""The admin API of ``genloop up``: other programs steer the running service over HTTP.

It runs in the control plane's process (``services.service``), on a port of its own, never in the
Serve replicas, which only infer: an admin call cannot take an inference slot, and a replica holds
no registry credentials. Every route does what the matching CLI verb does, through the same
functions (``services.lifecycle``, the scheduler, the catalog), so the two always agree.

Tokens come from ``GENLOOP_ADMIN_TOKEN``: comma-separated ``NAME:TOKEN`` pairs (a bare ``TOKEN`` is
named ``admin``), sent as ``Authorization: Bearer TOKEN``; no header is a 401, a token that is
none of them a 403. The token's name is the actor in the audit log for every mutating call.
Without tokens the API only listens on a loopback address (``services.service`` refuses
otherwise). Errors have the same JSON shape as the OpenAI routes' errors.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from genloop.monitoring.drift import DriftResult
from genloop.services.audit import AuditLog
from genloop.services.catalog import ModelRow, list_models
from genloop.services.config import GenloopConfig
from genloop.services.drift_check import latest_drift
from genloop.services.lifecycle import PromotionRefused, promote, rollback, set_challenger
from genloop.services.lifecycle import roles as current_roles
from genloop.services.registry import Registry, UnknownVersion
from genloop.services.scheduler import GenloopScheduler, JobRun, JobStage
from genloop.serving.protocol import error_body
from genloop.training.errors import UserInputError

ADMIN_TOKEN_ENV = "GENLOOP_ADMIN_TOKEN"
PREFIX = "/admin"
REPORT_TYPES = {".html", ".json", ".png", ".svg"}
NO_TOKEN_ACTOR = "admin-api"  # who the audit log names when no token is configured (loopback only)

T = TypeVar("T")


def admin_tokens(value: str | None = None) -> dict[str, str]:
    """Token → name, from ``GENLOOP_ADMIN_TOKEN`` (or ``value``)."""
    tokens: dict[str, str] = {}
    for entry in (value if value is not None else os.environ.get(ADMIN_TOKEN_ENV, "")).split(","):
        name, _, token = entry.strip().rpartition(":")
        if token:
            tokens[token] = name or "admin"
    return tokens


class AdminError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.extra = status, message, param, extra or {}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000, description="Why; recorded in the audit log.")


class PromoteRequest(_Body):
    force: bool = Field(False, description="Skip the gate (recorded; needs a reason).")


class ChallengerRequest(_Body):
    version: str = Field(max_length=100, description="Version (3, v3) or alias to shadow-serve.")


class Roles(BaseModel):
    champion: str | None
    previous: str | None
    challenger: str | None = None
    report: str | None = Field(None, description="The gate's report, when one judged the change.")


class JobDetail(JobRun):
    stage: str | None = Field(description="The latest stage it reached.")
    mlflow_run_id: str | None = Field(description="The training run it started, if any.")
    reports: list[str] = Field(description="Links to the reports it wrote (gate, drift).")
    stages: list[JobStage]


class Accepted(BaseModel):
    id: int
    job: str
    outcome: str
    url: str


class DriftView(DriftResult):
    report: str = Field(description="The HTML report: a link under /admin/reports from the admin API, a file path from "
                                    "`genloop drift --json`.")


def report_link(path: str) -> str:
    return f"{PREFIX}/reports/{path}"


def build_admin_api(config: GenloopConfig, scheduler: GenloopScheduler, aliases_moved: Callable[[], None],
                    stopping: threading.Event, tokens: dict[str, str]) -> FastAPI:
    """The admin routes over ``scheduler`` (which runs retrains) and the registry of ``config``;
    ``aliases_moved`` is called after a promotion, rollback or challenger change (the watcher rolls
    out at once); while ``stopping`` is set, mutating calls are refused with a 503."""
    api = FastAPI(title="genloop admin", docs_url=None, redoc_url=None,
                  description="Steer a running `genloop up`: models, promotion, rollback, retraining, jobs, drift.")
    bearer = HTTPBearer(auto_error=False)
    retrain_lock = threading.Lock()  # "is one running?" and "queue one" as one step

    def actor(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        if not tokens:
            return NO_TOKEN_ACTOR
        if credentials is None:
            raise AdminError(401, "missing bearer token: send Authorization: Bearer <token>")
        for token, name in tokens.items():
            if hmac.compare_digest(credentials.credentials.encode(), token.encode()):
                return name
        raise AdminError(403, "this token is not an admin token")

    def mutating(name: str = Depends(actor)) -> str:
        if stopping.is_set():
            raise AdminError(503, "genloop is stopping; try again once it is back")
        return name

    @api.exception_handler(AdminError)
    async def _admin_error(_request: Request, exc: AdminError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({**error_body(exc.status, exc.message, exc.param), **exc.extra}, status_code=exc.status,
                            headers=headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        return JSONResponse(error_body(400, f"{param}: {first['msg']}" if param else first["msg"], param),
                            status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    def lifecycle_call(call: Callable[[], T]) -> T:
        try:
            return call()
        except UnknownVersion as exc:
            raise AdminError(404, str(exc), "version") from None
        except UserInputError as exc:
            raise AdminError(400, str(exc)) from None

    @api.get(f"{PREFIX}/models", dependencies=[Depends(actor)])
    def models() -> list[ModelRow]:
        """Registered versions with their roles, data, metrics, verdict, cost and feedback."""
        return list_models(config)

    @api.post(f"{PREFIX}/promote/{{version}}")
    def promote_version(version: str, body: PromoteRequest | None = None, name: str = Depends(mutating)) -> Roles:
        """Make VERSION the champion if the gate passes it (409 with the report when it does not);
        ``force`` skips the gate and needs a ``reason``. Takes as long as the gate (minutes)."""
        body = body or PromoteRequest()
        try:
            report = lifecycle_call(lambda: promote(config, version, force=body.force, reason=body.reason,
                                                    actor=name))
        except PromotionRefused as refused:
            link = report_link(f"evaluations/{refused.report.id}.html") if refused.report is not None else None
            raise AdminError(409, str(refused), extra={"report": link}) from None
        aliases_moved()
        return _roles(config, report_link(f"evaluations/{report.id}.html") if report is not None else None)

    @api.post(f"{PREFIX}/rollback")
    def rollback_champion(body: _Body | None = None, name: str = Depends(mutating)) -> Roles:
        """Swap champion and previous: the old champion serves again."""
        lifecycle_call(lambda: rollback(config, reason=(body or _Body()).reason, actor=name))
        aliases_moved()
        return _roles(config)

    @api.put(f"{PREFIX}/challenger")
    def put_challenger(body: ChallengerRequest, name: str = Depends(mutating)) -> Roles:
        """Name a version the challenger: shadow-served when serving.shadow_percent > 0."""
        lifecycle_call(lambda: set_challenger(config, body.version, reason=body.reason, actor=name))
        aliases_moved()
        return _roles(config)

    @api.delete(f"{PREFIX}/challenger")
    def delete_challenger(reason: str = Query("", max_length=2000), name: str = Depends(mutating)) -> Roles:
        lifecycle_call(lambda: set_challenger(config, None, reason=reason, actor=name))
        aliases_moved()
        return _roles(config)

    @api.post(f"{PREFIX}/retrain", status_code=202)
    def retrain_now(body: _Body | None = None, name: str = Depends(mutating)) -> JSONResponse:
        """Queue a retraining round now (it never waits for the off-peak window); 409 while one is
        queued or running. Follow it at the returned url."""
        audit = AuditLog(config.state_db)
        with retrain_lock:
            running = scheduler.history.active("retrain")
            if running is not None:
                raise AdminError(409, f"retrain run {running.id} is {running.outcome}; wait for it to end",
                                 extra={"running": running.id, "url": f"{PREFIX}/jobs/{running.id}"})
            run_id = scheduler.run_now("retrain", "manual")
        with audit.exclusive() as connection:
            audit.record(connection, actor=name, action="retrain", from_version=None, to_version=None,
                         outcome="queued", reason=f"job run {run_id}" + (f": {body.reason}" if body and body.reason
                                                                         else ""))
        accepted = Accepted(id=run_id, job="retrain", outcome="queued", url=f"{PREFIX}/jobs/{run_id}")
        return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": accepted.url})

    @api.get(f"{PREFIX}/jobs", dependencies=[Depends(actor)])
    def jobs(limit: int = Query(20, ge=1, le=500)) -> list[JobRun]:
        """The latest job runs (retrain, drift, ingest), newest first."""
        return scheduler.history.recent(limit)

    @api.get(f"{PREFIX}/jobs/{{run_id}}", dependencies=[Depends(actor)])
    def job(run_id: int) -> JobDetail:
        """One job run: its stages, the MLflow run it trained, the reports it wrote."""
        found = scheduler.history.get(run_id)
        if found is None:
            raise AdminError(404, f"no job run {run_id}", "run_id")
        run, stages = found
        return JobDetail(**run.model_dump(), stage=stages[-1].stage if stages else None,
                         mlflow_run_id=next((s.mlflow_run_id for s in reversed(stages) if s.mlflow_run_id), None),
                         reports=[report_link(s.report) for s in stages if s.report], stages=stages)

    @api.get(f"{PREFIX}/drift", dependencies=[Depends(actor)])
    def drift() -> DriftView:
        """The latest drift check: verdict, per-feature scores, the report."""
        result = latest_drift(config)
        if result is None:
            raise AdminError(404, "no drift check has run yet")
        return DriftView(**result.model_dump(), report=report_link(f"drift/{result.id}.html"))

    @api.get(f"{PREFIX}/reports/{{path:path}}", dependencies=[Depends(actor)])
    def report(path: str) -> FileResponse:
        """A report file (gate evaluations, drift): HTML for people, JSON for programs."""
        root = config.reports_dir.resolve()
        file = (root / path).resolve()
        if not file.is_relative_to(root) or file.suffix not in REPORT_TYPES or not file.is_file():
            raise AdminError(404, f"no report {path!r}", "path")
        return FileResponse(file)

    return api


def _roles(config: GenloopConfig, report: str | None = None) -> Roles:
    current = current_roles(config)
    challenger = Registry(config).alias_version("challenger")
    return Roles(champion=current.champion, previous=current.previous,
                 challenger=str(challenger.version) if challenger is not None else None, report=report)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
