"""VLLMEngine: the Engine interface over vLLM's asynchronous engine, for GPU hosts.

vLLM brings paged attention, CUDA graphs and its own continuous batching, so on a GPU it serves
far more tokens per second than HFEngine. It is an optional dependency (``genloop[vllm]``, CUDA
only), so this module imports vLLM lazily inside ``load()``: the Serve deployment, the CLI and
the tests import it on any machine, and only a replica that actually starts a vLLM engine needs
the package. It keeps to vLLM's long-stable surface: ``AsyncEngineArgs``,
``AsyncLLMEngine.from_engine_args`` (an alias of ``AsyncLLM`` in vLLM v1), ``SamplingParams`` with
``RequestOutputKind.DELTA`` and ``generate(prompt, params, request_id)``, whose async iterator
aborts the request in the engine when it is closed. The one exception is the stat logger passed as
``from_engine_args(stat_loggers=...)``, which vLLM marks unstable: it is read for the scheduler's
running and waiting counts only. vLLM's own ``vllm:*`` series land in the replica's registry too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import Field
from transformers import AutoTokenizer

from genloop.serving.engine import (
    Engine,
    EngineError,
    EngineOptions,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    Logprob,
    PositionLogprobs,
    SamplingParams,
)

logger = logging.getLogger(__name__)


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vLLM's ``SamplingParams`` keyword arguments for ``params``: the same names and meanings, one
    completion per request (the API fans n out), and vLLM's own default where ours is "unset" (top_k)."""
    kwargs: dict[str, Any] = {
        "n": 1,
        # max_tokens 0 asks for the prompt's logprobs alone: vLLM generates at least one token, which
        # stream() drops, as vLLM's own server does for echo with max_tokens 0.
        "max_tokens": max(params.max_tokens, 1),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stop": list(params.stop) or None,
        "seed": params.seed,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "min_p": params.min_p,
        "min_tokens": params.min_tokens,
        "ignore_eos": params.ignore_eos,
        "logprobs": params.logprobs,
        "prompt_logprobs": params.prompt_logprobs,
    }
    if params.top_k is not None:
        kwargs["top_k"] = params.top_k
    if params.json_schema is not None:
        # StructuredOutputsParams' fields; compact JSON, as the HF engine writes it (serving.hf.structured).
        kwargs["structured_outputs"] = {"json": params.json_schema, "disable_any_whitespace": True}
    return kwargs


def position_logprobs(token_ids: list[int], steps: list[dict[int, Any] | None], top: int,
                      text: Callable[[int], str]) -> list[PositionLogprobs]:
    """Our entries for vLLM's logprobs of ``token_ids``: ``steps[i]`` maps token ids to vLLM ``Logprob``s
    (``logprob``, ``rank``, ``decoded_token``) at token i's position, the token's own and the ``top``
    most likely; None where vLLM has none (a prompt's first token). ``text`` names a token vLLM did not
    decode."""
    entries = []
    for token, step in zip(token_ids, steps, strict=True):
        if step is None:
            entries.append(PositionLogprobs(token_id=token, token=text(token), logprob=None))
            continue
        ranked = sorted(step.items(), key=lambda item: item[1].logprob, reverse=True)[:top]
        entries.append(PositionLogprobs(
            token_id=token, token=_decoded(token, step[token], text), logprob=step[token].logprob,
            top=[Logprob(token_id=i, token=_decoded(i, logprob, text), logprob=logprob.logprob)
                 for i, logprob in ranked]))
    return entries


def _decoded(token: int, logprob: Any, text: Callable[[int], str]) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else text(token)


class _SchedulerLoad:
    """A vLLM stat logger that keeps what one engine core's scheduler reports after each step: the
    requests it runs and the requests waiting, which become the replica's running and waiting gauges.

    It speaks vLLM's ``StatLoggerBase`` interface by duck typing (vLLM is imported only in ``load()``),
    the way ``AsyncLLM.from_engine_args(stat_loggers=[factory])`` calls ``factory(vllm_config,
    engine_index)`` (``VLLMEngine.stat_logger``) once per engine core and ``record`` after each of its
    steps.
    """

    def __init__(self, load: dict[int, tuple[int, int]], engine_index: int):
        self._load, self._index = load, engine_index
        load[engine_index] = (0, 0)

    def record(self, scheduler_stats: Any, iteration_stats: Any, *_: Any, **__: Any) -> None:
        """Keep the scheduler's counts; the further arguments (engine index, cache stats) changed between
        vLLM releases and are not needed: this logger serves one engine core."""
        if scheduler_stats is not None:
            self._load[self._index] = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)

    def log(self) -> None:
        """vLLM's periodic console summary: the gauges are read when scraped, so there is nothing to print."""

    def log_engine_initialized(self) -> None:
        """vLLM's start-up summary: nothing to report beyond vLLM's own log."""


class VLLMEngineOptions(EngineOptions):
    """vLLM's options genloop sets; any other ``AsyncEngineArgs`` field goes in ``engine_args``."""

    dtype: str = Field("auto", description='vLLM dtype ("auto", "float16", "bfloat16").')
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may claim for "
                                          "weights and KV cache.")
    max_model_len: int | None = Field(None, ge=1, description="Context length to serve; None takes the model's.")
    max_num_seqs: int = Field(256, ge=1, description="Most sequences vLLM batches at once.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Further AsyncEngineArgs fields.")


class VLLMEngine(Engine):
    """A model folder served by vLLM.

    Args:
        model_path: Hugging Face model folder, as the registry stores it.
        model_version: registry version string reported with every response.
        options: ``VLLMEngineOptions``; keyword ``fields`` override single ones.
    """

    Options = VLLMEngineOptions

    def __init__(self, model_path: str | Path, model_version: str, options: VLLMEngineOptions | None = None,
                 **fields: Any):
        self.options = self.resolve_options(options, fields)
        self.model_path = Path(model_path)
        self._model_version = model_version
        self._args = {
            "model": str(self.model_path),
            **self.options.model_dump(exclude={"engine_args"}),
            **self.options.engine_args,
        }
        self._engine: Any = None
        self._vllm: Any = None
        self._load: dict[int, tuple[int, int]] = {}  # engine core → (running, waiting), by _SchedulerLoad
        self._context_length = 0

    def stat_logger(self, vllm_config: Any, engine_index: int) -> _SchedulerLoad:
        """vLLM's stat-logger factory: called once per engine core with its index."""
        return _SchedulerLoad(self._load, engine_index)

    @property
    def num_active(self) -> int:
        return sum(running for running, _ in self._load.values())

    @property
    def num_waiting(self) -> int:
        return sum(waiting for _, waiting in self._load.values())

    async def load(self) -> None:
        if self._engine is not None:
            return
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(
                "the vLLM engine needs the vllm package: install genloop[vllm] on a host with a CUDA GPU, "
                "or serve with the HF engine"
            ) from exc
        self._vllm = vllm
        try:
            # Our own copy of the tokenizer renders chat synchronously, with the template saved alongside.
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            args = vllm.AsyncEngineArgs(**{k: v for k, v in self._args.items() if v is not None})
            self._engine = vllm.AsyncLLMEngine.from_engine_args(args, stat_loggers=[self.stat_logger])
        except Exception as exc:  # vLLM raises many types; the caller needs one
            raise EngineError(f"vLLM could not load model version {self._model_version}: {exc}") from exc
        model_config = getattr(self._engine, "model_config", None)
        if model_config is None:
            model_config = await self._engine.get_model_config()
        self._context_length = int(model_config.max_model_len)
        self._vocab_size = max(self.tokenizer.get_vocab().values()) + 1  # vLLM refuses ids past it too
        logger.info("VLLMEngine serving %s (version %s)", self.model_path, self._model_version)

    def _sampling_params(self, request: GenerationRequest) -> Any:
        params = request.params
        self.check_params(params)
        if params.n != 1:
            raise InvalidRequestError("the engine serves n=1; send n requests", param="n")
        from vllm.sampling_params import RequestOutputKind

        kwargs = sampling_kwargs(params)
        if "structured_outputs" in kwargs:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        return self._vllm.SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._engine is None:
            raise EngineError("engine is not loaded")
        sampling = self._sampling_params(request)
        if request.prompt_token_ids is not None:  # vLLM checks too, but with a ValueError: a 500, not a 400
            self.check_token_ids(request.prompt_token_ids, "prompt_token_ids")
        prompt: Any = request.prompt if request.prompt is not None else {"prompt_token_ids": request.prompt_token_ids}
        outputs = self._engine.generate(prompt, sampling, request.request_id)
        prompt_tokens, completion_tokens = len(request.prompt_token_ids or []), 0
        # vLLM hands out each step's tokens as they come (DELTA), several at once when this consumer
        # fell behind: those share the time since the previous output evenly, one gap per token.
        gaps: list[float] = []
        last_at: float | None = None
        scoring = request.params.max_tokens == 0  # the one token vLLM made is dropped (see sampling_kwargs)
        try:
            while True:
                try:
                    output = await anext(outputs)
                except StopAsyncIteration:
                    break
                except ValueError as exc:  # vLLM's checks of the request (a schema it cannot enforce): its 400s
                    raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from None
                if output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                completion = output.outputs[0]
                token_ids = [] if scoring else list(completion.token_ids)
                completion_tokens += len(token_ids)
                if token_ids:
                    now = time.perf_counter()
                    if last_at is not None:
                        gaps.extend([(now - last_at) / len(token_ids)] * len(token_ids))
                    last_at = now
                finish = ("length" if scoring else completion.finish_reason) if output.finished else None
                if finish not in (None, "stop", "length"):
                    raise EngineError(f"vLLM ended request {request.request_id} with {finish!r}")
                yield GenerationChunk(
                    text="" if scoring else completion.text,
                    token_ids=token_ids,
                    finish_reason=finish,
                    prompt_tokens=prompt_tokens or None,
                    completion_tokens=completion_tokens if finish else None,
                    inter_token_seconds=gaps if finish else None,
                    **self._logprobs(request.params, output, token_ids),
                )
        finally:
            await outputs.aclose()  # vLLM aborts the request when its generator is closed early

    def _logprobs(self, params: SamplingParams, output: Any, token_ids: list[int]) -> dict[str, Any]:
        """A chunk's logprobs from vLLM's ``RequestOutput``: its tokens', and the prompt's where vLLM hands
        them out (the first output), each when the request asked."""
        def text(token: int) -> str:
            return self.tokenizer.decode([token], skip_special_tokens=False)

        reported: dict[str, Any] = {}
        if params.logprobs is not None and params.max_tokens:
            steps = output.outputs[0].logprobs or []
            reported["logprobs"] = position_logprobs(token_ids, steps, params.logprobs, text)
        if params.prompt_logprobs is not None and output.prompt_logprobs:
            reported["prompt_logprobs"] = position_logprobs(list(output.prompt_token_ids), output.prompt_logprobs,
                                                            params.prompt_logprobs, text)
        return reported

    async def health(self) -> bool:
        if self._engine is None:
            return False
        try:
            await self._engine.check_health()
        except Exception:  # any failure means unhealthy
            logger.exception("vLLM health check failed")
            return False
        return True

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            shutdown = getattr(engine, "shutdown", None) or getattr(engine, "shutdown_background_loop", None)
            if shutdown is not None:
                shutdown()
            logger.info("VLLMEngine %s closed", self._model_version)
