"""The engine interface every inference backend implements, and the request/response models it speaks.

The Serve deployment and the OpenAI API layer only ever see ``Engine``: which backend runs the model
(transformers on CPU/GPU, vLLM on GPU) is a constructor argument, so tests run the real HF engine on a
tiny model and production swaps in vLLM without touching the API code. The models here are the
engine's own vocabulary, not OpenAI's wire format: the API layer translates, so an engine never has
to know about HTTP or ``n`` (the API fans ``n > 1`` out as ``n`` engine requests).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

FinishReason = Literal["stop", "length"]

# Texts up to this many characters are tokenized on the event loop, longer ones in a thread. A chat
# turn tokenizes in less time than the hop to a thread and back; at this length the loop would stall
# about a millisecond for everyone, and the hop is a small share of the work (measured with the
# tiny preset's tokenizer). Decoding is cheaper: 4096 ids decode in less time than 4096 characters
# tokenize (same tokenizer).
_TOKENIZE_INLINE_CHARS = 4096
_DECODE_INLINE_TOKENS = 4096

# Integers reach torch and vLLM as 64- and 32-bit values: larger ones must be refused here with a
# 400, not overflow in a tensor constructor (a 500, or a dead worker thread). The seed range is
# vLLM's (torch.long); counts are int32, which every context length fits in many times.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_COUNT = 2**31 - 1
MAX_N = 8  # choices per prompt the API fans out: each is a sequence of its own in the engine's batch
# Most alternatives a request may ask to see beside each token's logprob: vLLM's default max_logprobs
# (OpenAI allows 5 on /v1/completions and 20 on chat).
MAX_LOGPROBS = 20


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
    max_tokens: int = Field(16, ge=0, le=MAX_COUNT,
                            description="Most tokens to generate; reaching it finishes with 'length'. 0 generates "
                            "none, for a request that wants only its prompt_logprobs (scoring a text).")
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
    # Extras after OpenAI's fields: vLLM's, with vLLM's meanings and defaults.
    top_k: int | None = Field(
        None, ge=1, le=MAX_COUNT,
        description="Sample only among the k most likely tokens; None keeps all. Not in OpenAI's API.",
    )
    min_p: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Drop tokens less likely than min_p times the most likely one; 0 keeps all. Not in OpenAI's API.",
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, allow_inf_nan=False,
        description="Divides the positive logits (multiplies the negative ones) of every token of the prompt or the "
        "output so far; 1 is none, above 1 discourages repetition. Not in OpenAI's API.",
    )
    min_tokens: int = Field(
        0, ge=0, le=MAX_COUNT,
        description="Tokens to generate before eos or a stop string may end the completion. Not in OpenAI's API.",
    )
    ignore_eos: bool = Field(
        False, description="Go on past eos until max_tokens or a stop string (benchmarks use it to fix output "
        "lengths). Not in OpenAI's API.",
    )
    # What to report and how to constrain, as vLLM's SamplingParams names them.
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Report each generated token's logprob and this many most likely alternatives; None "
        "reports none.",
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Report each prompt token's logprob and this many most likely alternatives (what echo "
        "with logprobs shows); None reports none.",
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description='Constrain the output to JSON valid against this JSON Schema ({"type": "object"} for any '
        "object): OpenAI's response_format.",
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

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens_within_max_tokens(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must not exceed max_tokens ({max_tokens})")
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


class Logprob(BaseModel):
    """One token with its log-probability at a position."""

    token_id: int
    token: str = Field(description="The token's text, special tokens spelled out.")
    logprob: float = Field(description="Natural-log probability; -inf for a token the response_format forbade.")


class PositionLogprobs(BaseModel):
    """The logprobs at one position of a prompt or completion, as vLLM reports them by default
    ("raw_logprobs"): the log-softmax of the model's logits (after a response_format's mask) before
    penalties, temperature, top-k and top-p reshape them for sampling."""

    token_id: int = Field(description="The token at this position.")
    token: str = Field(description="Its text, special tokens spelled out.")
    logprob: float | None = Field(description="Its logprob; None for a prompt's first token, which nothing predicts.")
    top: list[Logprob] = Field(
        default_factory=list, description="The most likely tokens at this position, most likely first; as many as "
        "the request asked for (none for a prompt's first token).")


class GenerationChunk(BaseModel):
    """New output of one request since its previous chunk, as streamed to the client: one or more tokens
    (an engine may group tokens to bound the events per step; see serving.hf)."""

    text: str = Field("", description="New text since the previous chunk; may be empty while a stop string is pending.")
    token_ids: list[int] = Field(default_factory=list, description="Tokens generated since the previous chunk.")
    finish_reason: FinishReason | None = Field(
        None, description="Set on the last chunk: 'stop' (eos or stop string) or 'length' (max_tokens or context)."
    )
    prompt_tokens: int | None = Field(
        None, description="Prompt length in tokens, for usage: on the last chunk always, on the others where the "
        "engine knows it (streamed usage per chunk needs it)."
    )
    completion_tokens: int | None = Field(
        None, description="Tokens generated in all; set on the last chunk, for usage."
    )
    logprobs: list[PositionLogprobs] | None = Field(
        None, description="One per token of token_ids, when the request asked for logprobs.")
    prompt_logprobs: list[PositionLogprobs] | None = Field(
        None, description="One per prompt token, on the first chunk, when the request asked for prompt_logprobs.")
    # Timings for the metrics, on the last chunk: the chunks themselves may group tokens, so their arrival
    # times cannot tell the engine's pace.
    queue_seconds: float | None = Field(
        None, description="Set on the last chunk where the engine knows it: seconds from arrival to first scheduling.")
    inter_token_seconds: list[float] | None = Field(
        None, description="Set on the last chunk: seconds between each two consecutive tokens as the engine made them.")


class GenerationResult(BaseModel):
    """A finished completion with the numbers the API reports as usage and the metrics record as latency."""

    text: str = Field(description="The generated text, stop string excluded.")
    finish_reason: FinishReason = Field(description="'stop' (eos or stop string) or 'length' (max_tokens or context).")
    prompt_tokens: int = Field(description="Prompt length in tokens.")
    completion_tokens: int = Field(description="Tokens generated, including the one that ended generation.")
    ttft_seconds: float = Field(description="Seconds from submission to the first generated token.")
    total_seconds: float = Field(description="Seconds from submission to the last generated token.")
    queue_seconds: float | None = Field(
        None, description="Seconds from arrival at the engine to first scheduling; None where the engine does not say.")
    inter_token_seconds: list[float] = Field(
        default_factory=list, description="Seconds between each two consecutive generated tokens, as the engine "
        "made them: the inter-token latencies.")
    logprobs: list[PositionLogprobs] | None = Field(
        None, description="One per generated token, when the request asked for logprobs.")
    prompt_logprobs: list[PositionLogprobs] | None = Field(
        None, description="One per prompt token, when the request asked for prompt_logprobs.")


def render_chat_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render ``messages`` with a transformers tokenizer's chat template, opening the assistant's turn
    unless ``add_generation_prompt`` is False."""
    if tokenizer is None:
        raise EngineError("engine is not loaded")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors (bad roles, missing keys) are the caller's input
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

    # Set by every engine: the constructor sets the version, load() the tokenizer, the context length
    # and the vocabulary size.
    _model_version: str
    _context_length: int = 0
    _vocab_size: int = 0
    tokenizer: Any = None  # the model's transformers tokenizer: chat template, /tokenize, /detokenize

    @property
    def model_version(self) -> str:
        """The registry version this engine serves; stamped on responses, metrics and the inference log."""
        return self._model_version

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold; valid after load()."""
        return self._context_length

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to this, exclusive: the ids the tokenizer knows (vLLM's bound too).

        Valid after load()."""
        return self._vocab_size

    @property
    @abstractmethod
    def num_active(self) -> int:
        """Sequences being decoded now: the replica's genloop_requests_running gauge."""

    @property
    @abstractmethod
    def num_waiting(self) -> int:
        """Sequences that arrived but are not scheduled yet: the replica's genloop_requests_waiting gauge."""

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

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Chat messages as prompt text, rendered with the chat template stored with the model's tokenizer.

        It belongs to the engine because the template travels with the model version: a new
        champion may render chat differently. Opens an assistant turn unless ``add_generation_prompt``
        is False; raises InvalidRequestError (param "messages") if the model has no chat template.
        """
        return render_chat_template(self.tokenizer, messages, add_generation_prompt)

    def _loaded_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise EngineError("engine is not loaded")
        return self.tokenizer

    async def tokenize(self, text: str) -> list[int]:
        """``text`` as the engine's token ids (special tokens added as for a prompt); a long text is
        tokenized in a thread, so the event loop does not stall for everyone."""
        tokenizer = self._loaded_tokenizer()
        if len(text) <= _TOKENIZE_INLINE_CHARS:
            return tokenizer(text)["input_ids"]
        return (await asyncio.to_thread(tokenizer, text))["input_ids"]

    async def detokenize(self, ids: list[int]) -> str:
        """Token ids as text, special tokens included (what the model saw); ids checked with ``check_token_ids``
        first. Many ids are decoded in a thread, as ``tokenize`` does long texts."""
        tokenizer = self._loaded_tokenizer()
        if len(ids) <= _DECODE_INLINE_TOKENS:
            return tokenizer.decode(ids)
        return await asyncio.to_thread(tokenizer.decode, ids)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Raise InvalidRequestError naming ``param`` unless every id is in [0, vocab_size): the model
        must never index its embedding out of range, nor the tokenizer decode an id it does not know."""
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise InvalidRequestError(f"{param}: token id {bad} is outside the vocabulary [0, {self._vocab_size})",
                                      param=param)

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
        logprobs: list[PositionLogprobs] | None = None
        prompt_logprobs: list[PositionLogprobs] | None = None
        last: GenerationChunk | None = None
        async for chunk in self.stream(request):
            if ttft is None:
                ttft = time.perf_counter() - started
            parts.append(chunk.text)
            if chunk.logprobs is not None:
                logprobs = logprobs if logprobs is not None else []
                logprobs.extend(chunk.logprobs)
            prompt_logprobs = prompt_logprobs or chunk.prompt_logprobs
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
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            queue_seconds=last.queue_seconds,
            inter_token_seconds=last.inter_token_seconds or [],
        )
