"""The HTTP face of a replica: a FastAPI app built for each replica once its engine is loaded.

Serve calls the replica's ``__serve_build_asgi_app__`` after its constructor, which calls
``build_api(replica)``: the routes close over that replica, and the guard gets its settings as an
argument, so no module-level app carries state that a constructor sets. The routes only parse and
delegate; what a completion does is the replica's (``serving.app``). Every error leaves as OpenAI's
error shape: ours (``APIError``), the engine's (mapped by ``engine_error``), FastAPI's validation
errors and Starlette's HTTP errors.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from genloop.serving.engine import EngineError, EngineOverloaded, InvalidRequestError
from genloop.serving.guard import GuardSettings, RequestGuard
from genloop.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FeedbackRequest,
    TokenizeRequest,
    error_body,
)
from genloop.serving.settings import ServerSettings
from genloop.training.errors import echo

# Route label of the request metrics and the inference log: the API's own routes by name, anything
# else as "other", so that requests to made-up paths cannot grow the metric's label set without end.
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions", "/v1/models": "models",
          "/v1/feedback": "feedback", "/metrics": "metrics", "/tokenize": "tokenize", "/detokenize": "detokenize",
          "/version": "version"}


def route_of(path: str) -> str:
    return ROUTES.get(path, "other")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), exc.param)
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), headers={"Retry-After": "1"})
    return APIError(503, str(exc), headers={"Retry-After": "5"})


def stream_error(exc: Exception) -> Exception:
    """What a failed choice raises in a stream: an engine's error as its API error, anything else as is
    (the guard answers it with a 500 before the stream begins; the stream's own handler after)."""
    return engine_error(exc) if isinstance(exc, EngineError) else exc


class Replica(Protocol):
    """What the routes call: ``serving.app.OpenAIServer``."""

    settings: ServerSettings

    async def models(self) -> Response: ...
    async def completions(self, body: CompletionRequest, request: Request) -> Response: ...
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response: ...
    async def feedback(self, body: FeedbackRequest, request: Request) -> Response: ...
    async def tokenize(self, body: TokenizeRequest) -> Response: ...
    async def detokenize(self, body: DetokenizeRequest) -> Response: ...
    def refused(self, path: str, request_id: str, status: int, seconds: float, client: str) -> None: ...


def build_api(replica: Replica) -> FastAPI:
    """The OpenAI-compatible routes of ``replica``, behind the request guard (``serving.guard``)."""
    settings = replica.settings
    api = FastAPI(title="genloop", docs_url=None, redoc_url=None)
    api.add_middleware(RequestGuard, settings=GuardSettings(
        api_keys=settings.api_keys, public_paths=set(settings.public_paths), max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s, max_per_client=settings.max_requests_per_client,
        on_refused=replica.refused))
    api.exception_handler(APIError)(_api_error)
    api.exception_handler(RequestValidationError)(_validation_error)
    api.exception_handler(StarletteHTTPException)(_http_error)

    @api.get("/v1/models")
    async def models() -> Response:
        return await replica.models()

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await replica.completions(body, request)

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await replica.chat(body, request)

    @api.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request) -> Response:
        """Rate a response by its id: 1 good, 0 neutral, -1 bad (genloop extra, not OpenAI's API)."""
        return await replica.feedback(body, request)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        """A prompt's or a chat's token ids, as the model counts them (vLLM's route, outside /v1)."""
        return await replica.tokenize(body)

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        """Token ids as text (vLLM's route, outside /v1)."""
        return await replica.detokenize(body)

    @api.get("/version")
    async def server_version() -> dict[str, str]:
        """The genloop release serving (vLLM's route answers its own version)."""
        return {"version": version("genloop")}

    @api.get("/metrics")
    async def prometheus_metrics() -> Response:
        """The instruments of whichever replica answers: fine with one; Prometheus should scrape each
        replica's own port instead (see monitoring.scrape_targets)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return api


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status, headers=exc.headers)


# Pydantic names the union member that failed in an error's location ("prompt.list[str]"): not a
# parameter the caller wrote, so left out of the one the 400 names.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|dict|list)(\[.*\])?$|^function-")


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # A value error (ours, e.g. a lone surrogate) says more than the union's "should be a list".
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    location = [str(part) for part in first["loc"][1:] if not _UNION_MEMBER.match(str(part))]
    param = echo(".".join(location)) or None
    message = "invalid JSON body" if first["type"] == "json_invalid" else (
        f"unknown parameter {param}" if first["type"] == "extra_forbidden" else
        f"{param}: {first['msg']}" if param else first["msg"])
    return JSONResponse(error_body(400, message, param), status_code=400)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)
