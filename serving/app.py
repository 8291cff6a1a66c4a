"""The Ray Serve application: an OpenAI-compatible HTTP API over one ``Engine`` per replica.

Each replica owns one engine (the class is a constructor argument, so tests run the real HF
engine on a tiny model and production passes the vLLM engine) and one inference-log writer.
Serve does the rest: routing, ``max_ongoing_requests`` / ``max_queued_requests`` backpressure,
health checks (``check_health`` → engine health), and rolling updates when the app is deployed
again with another model version (new replicas become healthy before old ones drain).
"""


import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import (
    Engine,
    EngineError,
    EngineOverloaded,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    wrap_seed,
)
from monitoring import metrics
from monitoring.scrape_targets import ScrapeTarget
from services.config import LogText, echo
from serving.guard import GuardSettings, RequestGuard
from serving.inference_log import InferenceLog, InferenceRecord, hash_client
from serving.health import health_app, health_route
from serving.protocol import (
    MAX_PROMPTS,
    VERSION_HEADER,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    error_body,
    new_id,
    now,
)

logger = logging.getLogger(__name__)

class ServerSettings(BaseModel):
    """Everything a replica needs; built by the control plane (``genloop serve``)."""

    served_model_name: str = Field(description="The name clients pass as `model`.")
    model_path: str = Field(description="Local Hugging Face folder of the version served.")
    model_version: str = Field(description="Registry version served (stamped on every response).")
    engine_class: Any = Field(description="Engine subclass to instantiate.")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="Engine constructor options.")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys accepted; empty = no auth.")
    public_paths: list[str] = Field(default_factory=list, description="Paths answered without a key when keys "
                                    "are set (/health is always public: it is served by a deployment of its own).")
    max_requests_per_client: int | None = Field(
        None, ge=1, description="Requests one client (API key, else address) may have in a replica at once; "
        "past it 429 at once. None = no limit; genloop serve passes serving.max_requests_per_client.")
    max_body_bytes: int = Field(1_000_000, description="Request bodies past this many bytes get 413.")
    body_timeout_s: float = Field(10.0, description="A request body not received whole within this gets 408.")
    inference_log_dir: str | None = Field(None, description="Where the inference log goes; None = off.")
    log_text: LogText = Field("full", description="What the log keeps of prompts and outputs (see LogText).")
    log_flush_s: float = Field(1.0, description="Spooled log rows are written to parquet at least this often.")
    client_salt: str = Field(default_factory=lambda: secrets.token_hex(32),
                             description="Secret key of the hashed client ids in the log; genloop serve passes "
                             "the installation's, a bare replica makes its own.")
    shadow_percent: float = Field(0.0, ge=0, le=100, description="Share of requests mirrored to the shadow model.")
    scrape_targets_dir: str | None = Field(
        None, description="Where each replica announces its own /metrics port to Prometheus; None = not announced."
    )


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


api = FastAPI(title="genloop", docs_url=None, redoc_url=None)


api.add_middleware(RequestGuard)

# Route label of the request metrics and the inference log: the API's own routes by name, anything
# else as "other", so that requests to made-up paths cannot grow the metric's label set without end.
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions", "/v1/models": "models",
          "/metrics": "metrics"}


def route_of(path: str) -> str:
    return ROUTES.get(path, "other")


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status, headers=exc.headers)


# Pydantic names the union member that failed in an error's location ("prompt.list[str]"): not a
# parameter the caller wrote, so left out of the one the 400 names.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|dict|list)(\[.*\])?$|^function-")


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # A value error (ours, e.g. a lone surrogate) says more than the union's "should be a list".
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    location = [str(part) for part in first["loc"][1:] if not _UNION_MEMBER.match(str(part))]
    param = echo(".".join(location)) or None
    message = "invalid JSON body" if first["type"] == "json_invalid" else (
        f"unknown parameter {param}" if first["type"] == "extra_forbidden" else f"{param}: {first['msg']}")
    return JSONResponse(error_body(400, message, param), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


def _engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), exc.param)
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), headers={"Retry-After": "1"})
    return APIError(503, str(exc), headers={"Retry-After": "5"})


def _stream_error(exc: Exception) -> Exception:
    """What a failed choice raises in a stream: an engine's error as its API error, anything else as is
    (the guard answers it with a 500 before the stream begins; the stream's own handler after)."""
    return _engine_error(exc) if isinstance(exc, EngineError) else exc


# Module-level helpers sit above the deployment: Serve ships the class by value, and a helper
# defined after it is missing from what gets shipped.
class _EngineReplica:
    """What every replica that runs a model shares: its engine, its inference-log writer, health, shutdown."""

    async def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.engine: Engine = settings.engine_class(settings.model_path, settings.model_version,
                                                    **settings.engine_options)
        await self.engine.load()
        self.log = (InferenceLog(settings.inference_log_dir, text=settings.log_text,
                                 flush_seconds=settings.log_flush_s) if settings.inference_log_dir else None)
        self.scrape_target = None
        if settings.scrape_targets_dir:
            replica = serve.get_replica_context().replica_id
            self.scrape_target = ScrapeTarget(
                settings.scrape_targets_dir, f"{replica.deployment_id.name}-{replica.unique_id}",
                labels={"component": replica.deployment_id.name, "replica": replica.unique_id})
        metrics.MODEL_LOADS.labels(settings.model_version).inc()

    async def check_health(self) -> None:
        if not await self.engine.health():
            raise RuntimeError("engine is not healthy")

    async def __del__(self) -> None:  # Serve calls this on graceful shutdown, after draining
        if self.log is not None:
            self.log.close()
        await self.engine.close()
        if self.scrape_target is not None:
            self.scrape_target.close()

    def _log(self, *, route: str, response_id: str, prompt: str, result: GenerationResult | None, status: int,
             latency: float, client_hash: str = "", shadow: bool = False) -> None:
        if self.log is None:
            return
        accepted = self.log.append(InferenceRecord(
            request_id=response_id, route=route, model_version=self.settings.model_version, shadow=shadow,
            status=status, prompt=prompt, output=result.text if result else "",
            prompt_tokens=result.prompt_tokens if result else 0,
            completion_tokens=result.completion_tokens if result else 0,
            latency_seconds=latency, ttft_seconds=result.ttft_seconds if result else None, client_hash=client_hash,
        ))
        if not accepted:
            metrics.INFERENCE_LOG_DROPPED.inc()


def _usage(results: list[GenerationResult]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@serve.deployment(
    name="genloop",
    max_ongoing_requests=64,
    max_queued_requests=256,
    health_check_period_s=2,
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=60,
)
@serve.ingress(api)
class OpenAIServer(_EngineReplica):
    async def __init__(self, settings: ServerSettings, shadow: DeploymentHandle | None = None):
        await super().__init__(settings)
        api.state.settings = settings
        api.state.guard = GuardSettings(api_keys=settings.api_keys, public_paths=set(settings.public_paths),
                                        max_body_bytes=settings.max_body_bytes,
                                        body_timeout_s=settings.body_timeout_s,
                                        max_per_client=settings.max_requests_per_client, on_refused=self._refused)
        metrics.MODEL_INFO.labels(settings.model_version).set(1)
        # Engine gauges are read when scraped, whichever endpoint the scrape comes through.
        metrics.REQUESTS_RUNNING.labels(settings.model_version).set_function(
            lambda: getattr(self.engine, "num_active", 0))
        metrics.REQUESTS_WAITING.labels(settings.model_version).set_function(
            lambda: getattr(self.engine, "num_waiting", 0))
        self.shadow = shadow
        self._mirror_credit = 0.0
        self._mirrors: set[asyncio.Task] = set()
        logger.info("replica ready with v%s", settings.model_version)

    # --- plumbing -------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.settings.served_model_name:
            raise APIError(404, f"model {echo(model)!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", "model")

    def _headers(self) -> dict[str, str]:
        return {VERSION_HEADER: self.settings.model_version}

    def _record(self, request: Request, route: str, response_id: str, prompt: str, result: "GenerationResult | None",
                status: int, started: float, user: str | None) -> None:
        """Account one finished choice: metrics, then the inference log."""
        version = self.settings.model_version
        latency = time.perf_counter() - started
        metrics.REQUESTS.labels(route, str(status), version).inc()
        metrics.REQUEST_LATENCY.labels(route, version).observe(latency)
        if result is not None:
            metrics.TIME_TO_FIRST_TOKEN.labels(route, version).observe(result.ttft_seconds)
            if result.completion_tokens > 1:
                metrics.INTER_TOKEN_LATENCY.labels(route, version).observe(
                    (result.total_seconds - result.ttft_seconds) / (result.completion_tokens - 1))
            metrics.PROMPT_TOKENS.labels(version).inc(result.prompt_tokens)
            metrics.GENERATION_TOKENS.labels(version).inc(result.completion_tokens)
        client = user or request.headers.get("authorization", "") or (request.client.host if request.client else "")
        self._log(route=route, response_id=response_id, prompt=prompt, result=result, status=status,
                  latency=latency, client_hash=hash_client(client, self.settings.client_salt))

    def _refused(self, path: str, request_id: str, status: int, seconds: float, client: str) -> None:
        """An answer that was not a success (the guard reports each): counted and logged like the rest."""
        route = route_of(path)
        metrics.REQUESTS.labels(route, str(status), self.settings.model_version).inc()
        if route in ("completions", "chat.completions"):
            self._log(route=route, response_id=request_id, prompt="", result=None, status=status, latency=seconds,
                      client_hash=hash_client(client, self.settings.client_salt))

    def _validate(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"parameter {unsupported[0]} is not supported by genloop", unsupported[0])
        try:
            self.engine.check_params(body.sampling(1))
        except ValidationError as exc:  # engine-level limits, e.g. at most 4 stop strings
            error = exc.errors()[0]
            param = str(error["loc"][0]) if error["loc"] else None
            raise APIError(400, f"{param}: {error['msg']}", param) from None
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), exc.param) from None

    @staticmethod
    def _requests(prompts: list[str], body: Any, max_tokens: int) -> list[GenerationRequest]:
        """One engine request per choice: prompts × n, in OpenAI's choice order.

        With a seed, choice i samples with seed + i: n choices from one seed must differ, and the
        whole response must still be reproducible.
        """
        params = body.sampling(max_tokens)
        requests = []
        for prompt in prompts:
            for i in range(body.n):
                choice_params = params if params.seed is None else params.model_copy(
                    update={"seed": wrap_seed(params.seed + i)})
                requests.append(GenerationRequest(prompt=prompt, params=choice_params))
        return requests

    def _mirror(self, route: str, response_id: str, requests: list[GenerationRequest]) -> None:
        """Send a copy of every ``shadow_percent``-th request to the shadow model, without waiting.

        A credit counter, not a coin flip, so the mirrored share is exact on any traffic volume.
        The shadow's answer goes only to the inference log; its failures and backlog never reach
        the caller (its own small queue refuses, and that is counted).
        """
        if self.shadow is None:
            return
        self._mirror_credit += self.settings.shadow_percent / 100
        if self._mirror_credit < 1:
            return
        self._mirror_credit -= 1

        async def mirror() -> None:
            try:
                await self.shadow.mirror.remote(route, response_id, [r.model_dump() for r in requests])
                metrics.SHADOW_REQUESTS.labels("ok").inc()
            except Exception as exc:  # noqa: BLE001 — whatever the shadow does, the caller is unaffected
                metrics.SHADOW_REQUESTS.labels("error").inc()
                logger.warning("shadow request failed: %s", exc)

        task = asyncio.create_task(mirror())
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _run(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        try:
            return await asyncio.gather(*(self.engine.generate(r) for r in requests))
        except EngineError as exc:
            raise _engine_error(exc) from None

    async def _stream(self, requests: list[GenerationRequest], log: Any) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, chunk) from all choices as they come; closing it aborts them all.

        ``log(prompt, result, status)`` is called for each choice once the stream has begun: as it
        finishes (200), fails (the error's status) or is cut off by the caller leaving (499). Before
        the first chunk nothing is logged here: the request is then answered with an error status
        (or not at all), and the guard logs that answer once.
        """
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        begun = False

        async def pump(index: int, request: GenerationRequest) -> None:
            started, ttft, parts, ended = time.perf_counter(), None, [], False
            try:
                async for chunk in self.engine.stream(request):
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    parts.append(chunk.text)
                    if chunk.finish_reason is not None:
                        ended = True
                        log(request.prompt, GenerationResult(
                            text="".join(parts), finish_reason=chunk.finish_reason,
                            prompt_tokens=chunk.prompt_tokens or 0, completion_tokens=chunk.completion_tokens or 0,
                            ttft_seconds=ttft, total_seconds=time.perf_counter() - started), 200)
                    await queue.put((index, chunk))
            except Exception as exc:  # noqa: BLE001 — any failure is the caller's to see, in the stream
                ended = True
                if begun:
                    log(request.prompt, None, _engine_error(exc).status if isinstance(exc, EngineError) else 500)
                await queue.put((index, exc))
            finally:
                if not ended and begun:
                    log(request.prompt, None, 499)
                await queue.put((index, done))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                    continue
                if not isinstance(item, Exception):
                    begun = True
                yield index, item
        finally:
            for task in tasks:
                task.cancel()

    # --- routes -------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        card = {"id": self.settings.served_model_name, "object": "model", "created": now(), "owned_by": "genloop",
                "model_version": self.settings.model_version}
        return JSONResponse({"object": "list", "data": [card]}, headers=self._headers())

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        self._validate(body)
        prompts = body.prompts()
        if not prompts or len(prompts) > MAX_PROMPTS or any(not p for p in prompts):
            raise APIError(400, f"prompt must be 1 to {MAX_PROMPTS} non-empty strings", "prompt")
        response_id, created, started = new_id("cmpl"), now(), time.perf_counter()
        requests = self._requests(prompts, body, body.max_tokens)
        self._mirror("completions", response_id, requests)

        def log(prompt: str, result: GenerationResult | None, status: int = 200) -> None:
            self._record(request, "completions", response_id, prompt, result, status, started, body.user)

        if body.stream:
            return await self._sse(request, self._completion_events(requests, body, response_id, created, log))
        results = await self._run(requests)
        for generation, result in zip(requests, results):
            log(generation.prompt, result)
        return JSONResponse(CompletionResponse(
            id=response_id, created=created, model=body.model, model_version=self.settings.model_version,
            choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
                     for i, r in enumerate(results)],
            usage=_usage(results),
        ).model_dump(), headers=self._headers())

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        self._validate(body)
        prompt = self.engine.render_chat([m.model_dump(exclude_none=True) for m in body.messages])
        response_id, created, started = new_id("chatcmpl"), now(), time.perf_counter()
        requests = self._requests([prompt], body, body.token_budget(default=256))
        self._mirror("chat.completions", response_id, requests)

        def log(prompt: str, result: GenerationResult | None, status: int = 200) -> None:
            self._record(request, "chat.completions", response_id, prompt, result, status, started, body.user)

        if body.stream:
            return await self._sse(request, self._chat_events(requests, body, response_id, created, log))
        results = await self._run(requests)
        for result in results:
            log(prompt, result)
        return JSONResponse(ChatCompletionResponse(
            id=response_id, created=created, model=body.model, model_version=self.settings.model_version,
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=r.text), finish_reason=r.finish_reason)
                     for i, r in enumerate(results)],
            usage=_usage(results),
        ).model_dump(), headers=self._headers())

    @api.get("/metrics")
    async def prometheus_metrics(self) -> Response:
        """The instruments of whichever replica answers: fine with one; Prometheus should scrape each
        replica's own port instead (see monitoring.scrape_targets)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # --- server-sent events ---------------------------------------------------------------
    async def _sse(self, request: Request, events: AsyncIterator[dict]) -> StreamingResponse:
        """Stream ``events``; the first is awaited here, so a request the engine refuses is a 4xx, not a
        200 whose body carries an error. Later failures can only be reported inside the stream."""
        request_id = request.state.request_id
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None

        async def body() -> AsyncIterator[str]:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"
            except Exception:  # noqa: BLE001 — the 200 is sent: the error can only be told in the stream
                logger.exception("stream of request %s failed", request_id)
                yield f"data: {json.dumps(error_body(500, f'internal error; request id {request_id}'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=self._headers())

    def _usage_event(self, body: Any, response_id: str, created: int, kind: str, usage: list[int]) -> dict | None:
        if not (body.stream_options and body.stream_options.include_usage):
            return None
        return {"id": response_id, "object": kind, "created": created, "model": body.model, "choices": [],
                "usage": Usage(prompt_tokens=usage[0], completion_tokens=usage[1],
                               total_tokens=sum(usage)).model_dump(),
                "model_version": self.settings.model_version}

    async def _completion_events(self, requests, body, response_id, created, log) -> AsyncIterator[dict]:
        usage = [0, 0]
        async for index, chunk in self._stream(requests, log):
            if isinstance(chunk, Exception):
                raise _stream_error(chunk)
            if chunk.finish_reason is not None:
                usage[0] += chunk.prompt_tokens or 0
                usage[1] += chunk.completion_tokens or 0
            yield CompletionResponse(
                id=response_id, created=created, model=body.model, model_version=self.settings.model_version,
                choices=[CompletionChoice(index=index, text=chunk.text, finish_reason=chunk.finish_reason)],
            ).model_dump(exclude={"usage"})
        event = self._usage_event(body, response_id, created, "text_completion", usage)
        if event is not None:
            yield event

    async def _chat_events(self, requests, body, response_id, created, log) -> AsyncIterator[dict]:
        def chunk_of(choice: ChatChunkChoice) -> dict:
            return ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=[choice],
                                       model_version=self.settings.model_version).model_dump(exclude={"usage"})

        usage = [0, 0]
        opened: set[int] = set()
        async for index, chunk in self._stream(requests, log):
            if isinstance(chunk, Exception):
                raise _stream_error(chunk)
            if index not in opened:  # OpenAI opens each choice with the role alone
                opened.add(index)
                yield chunk_of(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))
            if chunk.finish_reason is not None:
                usage[0] += chunk.prompt_tokens or 0
                usage[1] += chunk.completion_tokens or 0
            yield chunk_of(ChatChunkChoice(index=index, delta=ChatDelta(content=chunk.text or None),
                                           finish_reason=chunk.finish_reason))
        event = self._usage_event(body, response_id, created, "chat.completion.chunk", usage)
        if event is not None:
            yield event


@serve.deployment(name="shadow", max_ongoing_requests=32, max_queued_requests=32, health_check_period_s=2,
                  graceful_shutdown_wait_loop_s=1, graceful_shutdown_timeout_s=30)
class ShadowModel(_EngineReplica):
    """The challenger in shadow mode: answers mirrored requests into the inference log, never to a caller.

    Its rows carry the caller's response id, so champion and challenger answers to the same prompt
    join on ``request_id`` for comparison.
    """

    async def mirror(self, route: str, response_id: str, requests: list[dict]) -> None:
        async def answer(request: GenerationRequest) -> None:
            started = time.perf_counter()
            try:
                result, status = await self.engine.generate(request), 200
            except EngineError as exc:
                result, status = None, _engine_error(exc).status
            self._log(route=route, response_id=response_id, prompt=request.prompt or "", result=result,
                      status=status, latency=time.perf_counter() - started, shadow=True)

        await asyncio.gather(*(answer(GenerationRequest.model_validate(r)) for r in requests))


def build_app(settings: ServerSettings, num_replicas: int = 1, max_ongoing_requests: int = 64,
              max_queued_requests: int = 256, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
              shadow: ServerSettings | None = None):
    """The Serve application, ready for ``serve.run``.

    Backpressure is Serve's: a replica takes ``max_ongoing_requests`` at once, a caller waits in a
    queue of ``max_queued_requests``, and beyond that Serve answers 429 with Retry-After at once, never
    an unbounded queue. With ``shadow`` settings, one replica of the shadow model runs beside the
    server and gets ``settings.shadow_percent`` % of the requests mirrored to it.
    """
    options = {"ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": replica_gpus}}
    shadow_app = ShadowModel.options(**options).bind(shadow) if shadow is not None else None
    return OpenAIServer.options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1), **options,
    ).bind(settings, shadow_app)


def serve_app(settings: ServerSettings, name: str = "genloop", route_prefix: str = "/", **options) -> None:
    """Deploy (or roll) the application ``name`` at ``route_prefix`` with its health application beside
    it (``serving.health``), and return once the model's replicas serve. On a first deploy the health
    application goes first, so ``/health`` says "unavailable" rather than 404 while the replicas load;
    it names the new version once the rollout is done. ``options`` are ``build_app``'s."""
    health, route = f"{name}-health", health_route(route_prefix)
    if health not in serve.status().applications:
        serve.run(health_app(name, ""), name=health, route_prefix=route)
    serve.run(build_app(settings, **options), name=name, route_prefix=route_prefix)
    serve.run(health_app(name, settings.model_version), name=health, route_prefix=route)


def delete_app(name: str = "genloop") -> None:
    """Delete the application ``name`` (which drains it), then its health application."""
    serve.delete(name)
    serve.delete(f"{name}-health")
