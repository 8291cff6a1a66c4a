"""VLLMEngine: the Engine interface over vLLM's asynchronous engine, for GPU hosts.

vLLM brings paged attention, CUDA graphs and its own continuous batching, so on a GPU it serves
far more tokens per second than HFEngine. It is an optional dependency (``genloop[vllm]``, CUDA
only), so this module imports vLLM lazily inside ``load()``: the Serve deployment, the CLI and
the tests import it on any machine, and only a replica that actually starts a vLLM engine needs
the package. It keeps to vLLM's long-stable surface: ``AsyncEngineArgs``,
``AsyncLLMEngine.from_engine_args`` (an alias of ``AsyncLLM`` in vLLM v1), ``SamplingParams`` with
``RequestOutputKind.DELTA`` and ``generate(prompt, params, request_id)``, whose async iterator
aborts the request in the engine when it is closed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
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
    render_chat_template,
)

logger = logging.getLogger(__name__)



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
        self._tokenizer: Any = None
        self._context_length = 0

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
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            args = vllm.AsyncEngineArgs(**{k: v for k, v in self._args.items() if v is not None})
            self._engine = vllm.AsyncLLMEngine.from_engine_args(args)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types; the caller needs one
            raise EngineError(f"vLLM could not load model version {self._model_version}: {exc}") from exc
        model_config = getattr(self._engine, "model_config", None)
        if model_config is None:
            model_config = await self._engine.get_model_config()
        self._context_length = int(model_config.max_model_len)
        logger.info("VLLMEngine serving %s (version %s)", self.model_path, self._model_version)

    def _sampling_params(self, request: GenerationRequest) -> Any:
        params = request.params
        self.check_params(params)
        if params.n != 1:
            raise InvalidRequestError("the engine serves n=1; send n requests", param="n")
        from vllm.sampling_params import RequestOutputKind

        extra = {"top_k": params.top_k} if params.top_k is not None else {}
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            output_kind=RequestOutputKind.DELTA,
            **extra,
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._engine is None:
            raise EngineError("engine is not loaded")
        sampling = self._sampling_params(request)
        prompt: Any = request.prompt if request.prompt is not None else {"prompt_token_ids": request.prompt_token_ids}
        outputs = self._engine.generate(prompt, sampling, request.request_id)
        prompt_tokens, completion_tokens = 0, 0
        try:
            async for output in outputs:
                if output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                completion = output.outputs[0]
                completion_tokens += len(completion.token_ids)
                finish = completion.finish_reason if output.finished else None
                if finish not in (None, "stop", "length"):
                    raise EngineError(f"vLLM ended request {request.request_id} with {finish!r}")
                yield GenerationChunk(
                    text=completion.text,
                    token_ids=list(completion.token_ids),
                    finish_reason=finish,
                    prompt_tokens=prompt_tokens if finish else None,
                    completion_tokens=completion_tokens if finish else None,
                )
        finally:
            await outputs.aclose()  # vLLM aborts the request when its generator is closed early

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat_template(self._tokenizer, messages)

    async def health(self) -> bool:
        if self._engine is None:
            return False
        try:
            await self._engine.check_health()
        except Exception:  # noqa: BLE001 - any failure means unhealthy
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
