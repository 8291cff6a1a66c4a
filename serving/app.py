"""The Ray Serve application: an OpenAI-compatible HTTP API over one ``Engine`` per replica.

Each replica owns one engine (the class is a setting, so tests run the real HF engine on a tiny
model and production passes the vLLM engine), one inference-log writer and its HTTP app
(``serving.api.build_api``, built once the engine is loaded). Serve does the rest: routing,
``max_ongoing_requests`` / ``max_queued_requests`` backpressure, health checks (``check_health`` →
engine health), and rolling updates when the app is deployed again with another model version (new
replicas become healthy before old ones drain).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from genloop.monitoring import metrics
from genloop.monitoring.scrape_targets import ScrapeTarget
from genloop.serving.api import APIError, build_api, engine_error, route_of
from genloop.serving.engine import (
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    SamplingParams,
    wrap_seed,
)
from genloop.serving.health import health_app, health_route
from genloop.serving.inference_log import InferenceLog, InferenceRecord, hash_client
from genloop.serving.protocol import (
    MAX_PROMPTS,
    VERSION_HEADER,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    FeedbackRequest,
    FeedbackResponse,
    TokenizeRequest,
    Usage,
    new_id,
    now,
)
from genloop.serving.settings import DeploymentOptions, ServerSettings
from genloop.serving.sse import chat_events, completion_events, sse_response
from genloop.training.errors import echo

logger = logging.getLogger(__name__)

CHAT_MAX_TOKENS = 256  # a chat completion's length limit when the request sets none


# Module-level helpers sit above the deployment: Serve ships the class by value, and a helper
# defined after it is missing from what gets shipped.
class _EngineReplica:
    """What every replica that runs a model shares: its engine, its inference-log writer, health, shutdown."""

    async def __init__(self, settings: ServerSettings):  # type: ignore[misc]  # Serve awaits async constructors
        self.settings = settings
        self.engine: Engine = settings.build_engine()
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


def _completion_logprobs(body: CompletionRequest, result: GenerationResult) -> CompletionLogprobs | None:
    """A choice's logprobs when asked for: the prompt's first with echo (the engine had them only then)."""
    if body.logprobs is None:
        return None
    return CompletionLogprobs.of([*(result.prompt_logprobs or []), *(result.logprobs or [])])


def _usage(results: list[GenerationResult]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _observe_sequence(route: str, version: str, result: GenerationResult) -> None:
    """The timings and token counts of one finished sequence (one choice of one prompt), as vLLM keeps them."""
    metrics.PROMPT_TOKENS.labels(route, version).inc(result.prompt_tokens)
    metrics.GENERATION_TOKENS.labels(route, version).inc(result.completion_tokens)
    if result.queue_seconds is not None:
        metrics.QUEUE_TIME.labels(route, version).observe(result.queue_seconds)
    if result.completion_tokens:
        metrics.TIME_TO_FIRST_TOKEN.labels(route, version).observe(result.ttft_seconds)
    if result.completion_tokens > 1:
        metrics.TIME_PER_OUTPUT_TOKEN.labels(route, version).observe(
            (result.total_seconds - result.ttft_seconds) / (result.completion_tokens - 1))
    gaps = metrics.INTER_TOKEN_LATENCY.labels(route, version)
    for gap in result.inter_token_seconds:
        gaps.observe(gap)


class _Answer:
    """The accounting of one answered API request: called as each choice ends, with its result (None
    when it failed or was cut off) and status, it observes the choice's timings and has ``write_row``
    write its inference-log row; the request itself is counted once.

    A response with n choices for several prompts is one request, as a refused one is (the guard
    reports those, ``OpenAIServer.refused``): counting choices made a success count n times and an
    error once, which hid errors from the error rate. The request is counted when its last choice
    has ended, or when its stream closes first (``close``): a choice not heard of by then was cut
    off, by the caller leaving (499) or by another choice's failure, whose status the request takes.
    """

    def __init__(self, route: str, version: str, started: float, choices: int,
                 write_row: Callable[[str, GenerationResult | None, int, float], None]):
        self.route, self.version, self.started, self.choices = route, version, started, choices
        self.write_row = write_row
        self.results: list[GenerationResult] = []
        self.failed: int | None = None  # the status of the first choice that did not finish
        self.ended = 0
        self.counted = False

    def __call__(self, prompt: str, result: GenerationResult | None, status: int = 200) -> None:
        latency = time.perf_counter() - self.started
        if result is not None:
            _observe_sequence(self.route, self.version, result)
        if not self.counted:
            self.ended += 1
            if result is not None:
                self.results.append(result)
            elif self.failed is None:
                self.failed = status
            if self.ended == self.choices:
                self.close()
        self.write_row(prompt, result, status, latency)

    def close(self) -> None:
        """Count the request, once, with what its choices said so far."""
        if self.counted:
            return
        self.counted = True
        if self.failed is None and self.ended == self.choices:
            status, reason = 200, "length" if any(r.finish_reason == "length" for r in self.results) else "stop"
            metrics.REQUEST_PROMPT_TOKENS.labels(self.route, self.version).observe(
                sum(r.prompt_tokens for r in self.results))
            metrics.REQUEST_GENERATION_TOKENS.labels(self.route, self.version).observe(
                sum(r.completion_tokens for r in self.results))
        else:
            status = self.failed if self.failed is not None else 499
            reason = "abort" if status == 499 else "error"
        metrics.REQUESTS.labels(self.route, str(status), self.version, reason).inc()
        metrics.REQUEST_LATENCY.labels(self.route, self.version).observe(time.perf_counter() - self.started)


class OpenAIServer(_EngineReplica):
    """The model's replica: the OpenAI routes (``serving.api``) call the methods below.

    A plain class, so the API layer can be built and tested in-process (``create``, then
    ``build_api``); Serve runs it as ``OpenAIDeployment``, below.
    """

    @classmethod
    async def create(cls, settings: ServerSettings, shadow: DeploymentHandle | None = None) -> Self:
        """A replica built outside Serve (``__init__`` is async: Serve awaits it, and so does this).
        Close it with ``await replica.__del__()``, as Serve does."""
        replica = cls.__new__(cls)
        await replica.__init__(settings, shadow)  # type: ignore[misc]  # the async constructor, awaited
        return replica

    async def __init__(self, settings: ServerSettings,  # type: ignore[misc]  # Serve awaits async constructors
                       shadow: DeploymentHandle | None = None):
        await super().__init__(settings)
        metrics.MODEL_INFO.labels(settings.model_version).set(1)
        # Engine gauges are read when scraped, whichever endpoint the scrape comes through.
        metrics.REQUESTS_RUNNING.labels(settings.model_version).set_function(lambda: self.engine.num_active)
        metrics.REQUESTS_WAITING.labels(settings.model_version).set_function(lambda: self.engine.num_waiting)
        self.shadow = shadow
        self._mirror_credit = 0.0
        self._mirrors: set[asyncio.Task] = set()
        logger.info("replica ready with v%s", settings.model_version)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # --- plumbing -------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.settings.served_model_name:
            raise APIError(404, f"model {echo(model)!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", "model")

    def _headers(self) -> dict[str, str]:
        return {VERSION_HEADER: self.settings.model_version}

    def _client_hash(self, request: Request, user: str | None = None) -> str:
        client = user or request.headers.get("authorization", "") or (request.client.host if request.client else "")
        return hash_client(client, self.settings.client_salt)

    def _answer(self, request: Request, route: str, response_id: str, started: float, user: str | None,
                choices: int) -> _Answer:
        """The accounting of a request about to be answered, its rows logged under ``response_id``."""
        def write_row(prompt: str, result: GenerationResult | None, status: int, latency: float) -> None:
            self._log(route=route, response_id=response_id, prompt=prompt, result=result, status=status,
                      latency=latency, client_hash=self._client_hash(request, user))

        return _Answer(route, self.settings.model_version, started, choices, write_row)

    def refused(self, path: str, request_id: str, status: int, seconds: float, client: str) -> None:
        """An answer that was not a success (the guard reports each): counted and logged like the rest."""
        route = route_of(path)
        generates = route in ("completions", "chat.completions")
        reason = ("abort" if status == 499 else "error") if generates else "none"
        metrics.REQUESTS.labels(route, str(status), self.settings.model_version, reason).inc()
        if generates:
            self._log(route=route, response_id=request_id, prompt="", result=None, status=status, latency=seconds,
                      client_hash=hash_client(client, self.settings.client_salt))

    def _validate(self, body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
        """The request's sampling parameters, once genloop and the engine can honour every one set."""
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"parameter {unsupported[0]} is not supported by genloop", unsupported[0])
        try:
            params = body.sampling(max_tokens)
            self.engine.check_params(params)
        except ValidationError as exc:  # engine-level limits, e.g. at most 4 stop strings
            error = exc.errors()[0]
            param = str(error["loc"][0]) if error["loc"] else None
            raise APIError(400, f"{param}: {error['msg']}", param) from None
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), exc.param) from None
        return params

    async def _prompt_texts(self, prompts: list[str] | list[list[int]]) -> list[str]:
        """Each prompt as the inference log keeps it, text: token ids are checked (in the vocabulary,
        shorter than the context, before any decoding) and decoded."""
        texts = []
        for prompt in prompts:
            if isinstance(prompt, str):
                texts.append(prompt)
                continue
            if len(prompt) >= self.engine.context_length:
                raise APIError(400, f"prompt has {len(prompt)} tokens; the context holds "
                                    f"{self.engine.context_length}", "prompt")
            try:
                self.engine.check_token_ids(prompt, "prompt")
            except InvalidRequestError as exc:
                raise engine_error(exc) from None
            texts.append(await self.engine.detokenize(prompt))
        return texts

    @staticmethod
    def _requests(prompts: list[str] | list[list[int]], params: SamplingParams, n: int) -> list[GenerationRequest]:
        """One engine request per choice: prompts (texts or token ids) × n, in OpenAI's choice order.

        With a seed, choice i samples with seed + i: n choices from one seed must differ, and the
        whole response must still be reproducible.
        """
        requests = []
        for prompt in prompts:
            for i in range(n):
                choice_params = params if params.seed is None else params.model_copy(
                    update={"seed": wrap_seed(params.seed + i)})
                requests.append(GenerationRequest(prompt=prompt, params=choice_params) if isinstance(prompt, str)
                                else GenerationRequest(prompt_token_ids=prompt, params=choice_params))
        return requests

    def _mirror(self, route: str, response_id: str, requests: list[GenerationRequest]) -> None:
        """Send a copy of every ``shadow_percent``-th request to the shadow model, without waiting.

        A credit counter, not a coin flip, so the mirrored share is exact on any traffic volume.
        The shadow's answer goes only to the inference log; its failures and backlog never reach
        the caller (its own small queue refuses, and that is counted).
        """
        shadow = self.shadow
        if shadow is None:
            return
        self._mirror_credit += self.settings.shadow_percent / 100
        if self._mirror_credit < 1:
            return
        self._mirror_credit -= 1

        async def mirror() -> None:
            try:
                await shadow.mirror.remote(route, response_id, [r.model_dump() for r in requests])
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
            raise engine_error(exc) from None

    async def _stream(self, requests: list[GenerationRequest], prompts: list[str],
                      log: _Answer) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, chunk) from all choices as they come; closing it aborts them all.

        ``log(prompts[i], result, status)`` is called for choice i once the stream has begun: as it
        finishes (200), fails (the error's status) or is cut off by the caller leaving (499); closing
        the stream counts the request. Before the first chunk nothing is logged here: the request is
        then answered with an error status (or not at all), and the guard logs and counts that answer once.
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
                        log(prompts[index], GenerationResult(
                            text="".join(parts), finish_reason=chunk.finish_reason,
                            prompt_tokens=chunk.prompt_tokens or 0, completion_tokens=chunk.completion_tokens or 0,
                            ttft_seconds=ttft, total_seconds=time.perf_counter() - started,
                            queue_seconds=chunk.queue_seconds,
                            inter_token_seconds=chunk.inter_token_seconds or []), 200)
                    await queue.put((index, chunk))
            except Exception as exc:  # noqa: BLE001 — any failure is the caller's to see, in the stream
                ended = True
                if begun:
                    log(prompts[index], None, engine_error(exc).status if isinstance(exc, EngineError) else 500)
                await queue.put((index, exc))
            finally:
                if not ended and begun:
                    log(prompts[index], None, 499)
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
            if begun:  # counted now, whatever the cancelled choices report later
                log.close()

    # --- what the routes call ----------------------------------------------------------
    async def models(self) -> JSONResponse:
        card = {"id": self.settings.served_model_name, "object": "model", "created": now(), "owned_by": "genloop",
                "max_model_len": self.engine.context_length, "model_version": self.settings.model_version}
        return JSONResponse({"object": "list", "data": [card]}, headers=self._headers())

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = self._validate(body, body.max_tokens)
        prompts = body.prompts()
        if not prompts or len(prompts) > MAX_PROMPTS or any(not p for p in prompts):
            raise APIError(400, f"prompt must be 1 to {MAX_PROMPTS} non-empty texts or lists of token ids", "prompt")
        texts = [text for text in await self._prompt_texts(prompts) for _ in range(body.n)]  # one per choice
        response_id, created, started = new_id("cmpl"), now(), time.perf_counter()
        requests = self._requests(prompts, params, body.n)
        self._mirror("completions", response_id, requests)

        log = self._answer(request, "completions", response_id, started, body.user, len(requests))
        # With echo, each choice's text starts with its prompt (token ids decoded, as vLLM does).
        echoes = texts if body.echo else [""] * len(requests)

        if body.stream:
            return await sse_response(request.state.request_id, completion_events(
                self._stream(requests, texts, log), body, response_id, created, self.settings.model_version, echoes),
                self._headers())
        results = await self._run(requests)
        for text, result in zip(texts, results, strict=True):
            log(text, result)
        return JSONResponse(CompletionResponse(
            id=response_id, created=created, model=body.model, model_version=self.settings.model_version,
            choices=[CompletionChoice(index=i, text=echoed + r.text, logprobs=_completion_logprobs(body, r),
                                      finish_reason=r.finish_reason)
                     for i, (echoed, r) in enumerate(zip(echoes, results, strict=True))],
            usage=_usage(results),
        ).model_dump(), headers=self._headers())

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        prompt = self._render(body.messages)
        params = self._validate(body, body.token_budget() or await self._chat_budget(prompt))
        response_id, created, started = new_id("chatcmpl"), now(), time.perf_counter()
        requests = self._requests([prompt], params, body.n)
        self._mirror("chat.completions", response_id, requests)

        log = self._answer(request, "chat.completions", response_id, started, body.user, len(requests))

        if body.stream:
            return await sse_response(request.state.request_id, chat_events(
                self._stream(requests, [prompt] * len(requests), log), body, response_id, created,
                self.settings.model_version), self._headers())
        results = await self._run(requests)
        for result in results:
            log(prompt, result)
        return JSONResponse(ChatCompletionResponse(
            id=response_id, created=created, model=body.model, model_version=self.settings.model_version,
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=r.text),
                                logprobs=ChatLogprobs.of(r.logprobs or []) if body.logprobs else None,
                                finish_reason=r.finish_reason)
                     for i, r in enumerate(results)],
            usage=_usage(results),
        ).model_dump(), headers=self._headers())

    async def _chat_budget(self, prompt: str) -> int:
        """The tokens a chat completion may take when the request sets no limit: ``CHAT_MAX_TOKENS``, or
        what the context leaves after the prompt where that is less, so that on a small model an
        unlimited request is not a 400 (vLLM's default is all the context leaves)."""
        try:
            room = self.engine.context_length - len(await self.engine.tokenize(prompt))
        except EngineError as exc:
            raise engine_error(exc) from None
        return max(1, min(CHAT_MAX_TOKENS, room))

    def _render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        try:
            return self.engine.render_chat([m.for_template() for m in messages], add_generation_prompt)
        except EngineError as exc:
            raise engine_error(exc) from None

    async def tokenize(self, body: TokenizeRequest) -> JSONResponse:
        """vLLM's /tokenize: the ids a completion (prompt) or a chat completion (messages) would start from."""
        if body.model is not None:
            self._check_model(body.model)
        text = body.prompt if body.messages is None else self._render(body.messages, body.add_generation_prompt)
        try:
            tokens = await self.engine.tokenize(text or "")
        except EngineError as exc:
            raise engine_error(exc) from None
        return JSONResponse({"count": len(tokens), "max_model_len": self.engine.context_length, "tokens": tokens},
                            headers=self._headers())

    async def detokenize(self, body: DetokenizeRequest) -> JSONResponse:
        """vLLM's /detokenize: token ids as text, special tokens included."""
        if body.model is not None:
            self._check_model(body.model)
        try:
            self.engine.check_token_ids(body.tokens, "tokens")
            text = await self.engine.detokenize(body.tokens)
        except EngineError as exc:
            raise engine_error(exc) from None
        return JSONResponse({"prompt": text}, headers=self._headers())

    async def feedback(self, body: FeedbackRequest, request: Request) -> JSONResponse:
        """Keep a caller's rating as a row of the inference log, under the id of the response rated.

        The row names no model version: whichever replica takes the rating may serve another version
        than the one that answered, so the version comes from joining the rated response's row
        (``serving.inference_log.feedback_by_version``). A rating that cannot be kept is refused
        rather than acknowledged and lost.
        """
        if self.log is None:
            raise APIError(503, "this server keeps no inference log, so it cannot keep ratings")
        kept = self.log.append(InferenceRecord(
            request_id=body.id, route="feedback", model_version="", status=200, prompt="", output=body.comment or "",
            rating=body.rating, client_hash=self._client_hash(request)))
        if not kept:
            metrics.INFERENCE_LOG_DROPPED.inc()
            raise APIError(503, "the inference log is full; rate again shortly", headers={"Retry-After": "5"})
        metrics.REQUESTS.labels("feedback", "200", self.settings.model_version, "none").inc()
        return JSONResponse(FeedbackResponse(id=body.id, rating=body.rating).model_dump(), headers=self._headers())


# Serve's deployment of the model's replica, its routes the ASGI app ``__serve_build_asgi_app__`` builds.
OpenAIDeployment = serve.deployment(name="genloop", health_check_period_s=2, graceful_shutdown_wait_loop_s=1,
                                    graceful_shutdown_timeout_s=60)(serve.ingress()(OpenAIServer))


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
                result, status = None, engine_error(exc).status
            prompt = request.prompt if request.prompt is not None else await self.engine.detokenize(
                request.prompt_token_ids or [])
            self._log(route=route, response_id=response_id, prompt=prompt, result=result,
                      status=status, latency=time.perf_counter() - started, shadow=True)

        await asyncio.gather(*(answer(GenerationRequest.model_validate(r)) for r in requests))


def build_app(settings: ServerSettings, deployment: DeploymentOptions | None = None,
              shadow: ServerSettings | None = None):
    """The Serve application, ready for ``serve.run``: the model's deployment as ``deployment`` (None:
    the defaults) says (replicas, resources, Serve's backpressure) and, with ``shadow`` settings, one
    replica of the shadow model beside it, which gets ``settings.shadow_percent`` % of the requests mirrored."""
    deployment = deployment or DeploymentOptions()
    options = {"ray_actor_options": {"num_cpus": deployment.replica_cpus, "num_gpus": deployment.replica_gpus}}
    # serve.deployment made ShadowModel a Deployment; mypy keeps a class decorator's input type.
    shadow_app = ShadowModel.options(**options).bind(shadow) if shadow is not None else None  # type: ignore[attr-defined]
    scaling: dict[str, Any] = ({"autoscaling_config": deployment.autoscaling.model_dump()}
                               if deployment.autoscaling is not None else {"num_replicas": deployment.num_replicas})
    if deployment.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = deployment.max_replicas_per_node
    return OpenAIDeployment.options(
        max_ongoing_requests=deployment.max_ongoing_requests, max_queued_requests=deployment.max_queued_requests,
        **scaling,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1), **options,
    ).bind(settings, shadow_app)


def serve_app(settings: ServerSettings, name: str = "genloop", route_prefix: str = "/",
              deployment: DeploymentOptions | None = None, shadow: ServerSettings | None = None) -> None:
    """Deploy (or roll) the application ``name`` at ``route_prefix`` with its health application beside
    it (``serving.health``), and return once the model's replicas serve. On a first deploy the health
    application goes first, so ``/health`` says "unavailable" rather than 404 while the replicas load;
    it names the new version once the rollout is done."""
    health, route = f"{name}-health", health_route(route_prefix)
    if health not in serve.status().applications:
        serve.run(health_app(name, ""), name=health, route_prefix=route)
    serve.run(build_app(settings, deployment, shadow), name=name, route_prefix=route_prefix)
    serve.run(health_app(name, settings.model_version), name=health, route_prefix=route)


def announce_waiting(status: str, name: str = "genloop", route_prefix: str = "/") -> None:
    """Deploy only the health application of ``name``, saying ``status`` (e.g. "bootstrapping") with a
    503 until ``serve_app`` deploys the model: a load balancer sees why nothing answers yet."""
    serve.run(health_app(name, "", waiting=status), name=f"{name}-health", route_prefix=health_route(route_prefix))


def delete_app(name: str = "genloop") -> None:
    """Delete the application ``name`` (which drains it), then its health application."""
    serve.delete(name)
    serve.delete(f"{name}-health")
