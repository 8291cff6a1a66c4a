"""The engine interface every inference backend implements, and the request/response models it speaks.

The Serve deployment and the OpenAI API layer only ever see ``Engine``: which backend runs the model
(transformers on CPU/GPU, vLLM on GPU) is a constructor argument, so tests run the real HF engine on a
tiny model and production swaps in vLLM without touching the API code. The models here are the
engine's own vocabulary, not OpenAI's wire format: the API layer translates, so an engine never has
to know about HTTP or ``n`` (the API fans ``n > 1`` out as ``n`` engine requests).
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FinishReason = Literal["stop", "length"]

# Integers reach torch and vLLM as 64- and 32-bit values: larger ones must be refused here with a
# 400, not overflow in a tensor constructor (a 500, or a dead worker thread). The seed range is
# vLLM's (torch.long); counts are int32, which every context length fits in many times.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_COUNT = 2**31 - 1
MAX_N = 8  # choices per prompt the API fans out: each is a sequence of its own in the engine's batch


def wrap_seed(seed: int) -> int:
    """``seed`` folded into [SEED_MIN, SEED_MAX], as int64 arithmetic would: seed + i for the i-th
    choice must stay a valid seed at the ends of the range."""
    return (seed - SEED_MIN) % 2**64 + SEED_MIN


class EngineError(RuntimeError):
    """The engine cannot serve a request (not loaded, closed, failed); the API answers 503 / 500."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the API answers 429 so clients back off instead of piling on."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (prompt too long, unsupported parameter); the API answers 400.

    The message names the offending parameter, as DESIGN.md asks of validation errors.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class SamplingParams(BaseModel):
    """How to pick tokens; fields in OpenAI's order, defaults those of OpenAI's /v1/completions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time it was already generated."
    )
    max_tokens: int = Field(16, ge=1, le=MAX_COUNT,
                            description="Most tokens to generate; reaching it finishes with 'length'.")
    n: int = Field(
        1, ge=1, le=MAX_N, description="Completions per prompt; engines serve n=1 and the API fans n>1 out as n "
        "requests."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted once from the logit of every token already generated."
    )
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX,
        description="Seed of this request's own random generator, so sampled output is reproducible.",
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=4,
        description="Up to 4 strings that end generation; the stop string itself is not returned.",
    )
    temperature: float = Field(
        1.0, ge=0.0, le=2.0, description="Softmax temperature; 0 means greedy (argmax) decoding."
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p."
    )
    # Extras after OpenAI's fields.
    top_k: int | None = Field(
        None, ge=1, le=MAX_COUNT,
        description="Sample only among the k most likely tokens; None keeps all. Not in OpenAI's API.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        """OpenAI accepts a single string or a list; a bare string must not become a list of characters."""
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    def non_default_fields(self) -> set[str]:
        """Fields whose value differs from the default: what an engine must honour for this request."""
        defaults = type(self)()
        return {name for name in type(self).model_fields if getattr(self, name) != getattr(defaults, name)}


class GenerationRequest(BaseModel):
    """One completion to produce: a prompt (as text or token ids) and how to sample it."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex, description="Unique id, used in logs and to abort the request."
    )
    prompt: str | None = Field(
        None, description="Prompt text, tokenized by the engine; exclusive with prompt_token_ids."
    )
    prompt_token_ids: list[int] | None = Field(
        None, min_length=1, description="Prompt as token ids of the engine's tokenizer; exclusive with prompt."
    )
    params: SamplingParams = Field(default_factory=SamplingParams, description="Sampling parameters.")

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> GenerationRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        return self


class GenerationChunk(BaseModel):
    """New output of one request since its previous chunk, as streamed to the client: one or more tokens
    (an engine may group tokens to bound the events per step; see serving.hf)."""

    text: str = Field("", description="New text since the previous chunk; may be empty while a stop string is pending.")
    token_ids: list[int] = Field(default_factory=list, description="Tokens generated since the previous chunk.")
    finish_reason: FinishReason | None = Field(
        None, description="Set on the last chunk: 'stop' (eos or stop string) or 'length' (max_tokens or context)."
    )
    prompt_tokens: int | None = Field(None, description="Prompt length in tokens; set on the last chunk, for usage.")
    completion_tokens: int | None = Field(
        None, description="Tokens generated in all; set on the last chunk, for usage."
    )


class GenerationResult(BaseModel):
    """A finished completion with the numbers the API reports as usage and the metrics record as latency."""

    text: str = Field(description="The generated text, stop string excluded.")
    finish_reason: FinishReason = Field(description="'stop' (eos or stop string) or 'length' (max_tokens or context).")
    prompt_tokens: int = Field(description="Prompt length in tokens.")
    completion_tokens: int = Field(description="Tokens generated, including the one that ended generation.")
    ttft_seconds: float = Field(description="Seconds from submission to the first generated token.")
    total_seconds: float = Field(description="Seconds from submission to the last generated token.")


def render_chat_template(tokenizer: object, messages: list[dict[str, str]]) -> str:
    """Render ``messages`` with a transformers tokenizer's chat template, opening the assistant's turn."""
    if tokenizer is None:
        raise EngineError("engine is not loaded")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja errors (bad roles, missing keys) are the caller's input
        raise InvalidRequestError(f"cannot render messages: {exc}", param="messages") from exc


class EngineOptions(BaseModel):
    """Base of an engine's own options model (its ``Options``): typed, frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Engine(ABC):
    """An inference backend: loads one model version and serves generation requests concurrently.

    Constructed as ``Engine(model_path, model_version, options)`` with ``options`` an instance of the
    engine's ``Options`` (or None for its defaults), so ``ServerSettings`` can carry any engine's options.
    Life cycle: construct (cheap, no model) → ``await load()`` → any number of concurrent ``generate``
    / ``stream`` calls → ``await close()``. ``health()`` is False before load and after close, so a
    Serve replica reports unhealthy until its model is ready and after it has been drained.
    """

    # The engine's options model: what ``ServerSettings.engine_options`` holds for it.
    Options: ClassVar[type[EngineOptions]] = EngineOptions

    @classmethod
    def resolve_options(cls, options: EngineOptions | None, fields: dict) -> EngineOptions:
        """``options`` (or the defaults) with keyword ``fields`` overriding single ones, validated."""
        return cls.Options.model_validate({**(options or cls.Options()).model_dump(), **fields})

    # Set by every engine: the constructor sets the version, load() the context length.
    _model_version: str
    _context_length: int = 0

    @property
    def model_version(self) -> str:
        """The registry version this engine serves; stamped on responses, metrics and the inference log."""
        return self._model_version

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold; valid after load()."""
        return self._context_length

    @property
    def supported_params(self) -> frozenset[str]:
        """Sampling fields this engine honours, so the API can answer 400 instead of silently ignoring one.

        Every field but ``n`` (the API fans n out as n requests); an engine that honours fewer overrides this.
        """
        return frozenset(SamplingParams.model_fields) - {"n"}

    @abstractmethod
    async def load(self) -> None:
        """Load tokenizer and weights and start serving; raises EngineError if the model cannot be loaded."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Yield the output as chunks of one or more tokens as they are generated; the last carries finish_reason.

        Closing the iterator (client gone, task cancelled) aborts the request and frees its slot.
        """

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Chat messages as prompt text, rendered with the chat template stored with the model's tokenizer.

        It belongs to the engine because the template travels with the model version: a new
        champion may render chat differently. Opens an assistant turn; raises InvalidRequestError
        (param "messages") if the model has no chat template.
        """

    @abstractmethod
    async def health(self) -> bool:
        """True while the engine can take requests."""

    @abstractmethod
    async def close(self) -> None:
        """Stop serving, fail requests still running with EngineError and free the model."""

    def check_params(self, params: SamplingParams) -> None:
        """Raise InvalidRequestError naming any set parameter this engine cannot honour."""
        unsupported = sorted(params.non_default_fields() - self.supported_params)
        if unsupported:
            raise InvalidRequestError(
                f"parameter(s) not supported by this engine: {', '.join(unsupported)}", param=unsupported[0]
            )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole completion at once: the stream, collected. Engines may override for speed."""
        started = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        last: GenerationChunk | None = None
        async for chunk in self.stream(request):
            if ttft is None:
                ttft = time.perf_counter() - started
            parts.append(chunk.text)
            last = chunk
        if last is None or last.finish_reason is None:
            raise EngineError(f"request {request.request_id} ended without a finish reason")
        return GenerationResult(
            text="".join(parts),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens or 0,
            completion_tokens=last.completion_tokens or 0,
            ttft_seconds=ttft or 0.0,
            total_seconds=time.perf_counter() - started,
        )
