"""OpenAI's wire format for completions and chat: requests, responses, stream chunks, errors;
and genloop's feedback on a response.

Fields follow OpenAI's order, our extras after (``top_k``; ``model_version`` on responses).
Unknown fields are rejected rather than ignored, and OpenAI fields that genloop cannot honour
(logprobs, tools, …) are accepted by the schema only to be refused with a 400 that names them:
a client must never believe a parameter took effect when it did not.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from genloop.serving.engine import MAX_COUNT, MAX_N, SEED_MAX, SEED_MIN, SamplingParams

# Every response of the API, /health's too, names the registry version that answered in this header.
VERSION_HEADER = "x-genloop-model-version"

MAX_PROMPTS = 32


def _unicode(value: str) -> str:
    """JSON may carry a lone surrogate (``"\\ud800"``), which Python decodes into a str that no
    tokenizer and no UTF-8 writer accepts: refused here, where the 400 can name the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    return value


# Every string a request carries: prompts, messages, stop strings, names.
Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with usage before [DONE].")


class _SamplingFields(BaseModel):
    """The sampling fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=MAX_N, description=f"Choices per prompt (at most {MAX_N}).")
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 stop strings.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty on tokens already present.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty per earlier occurrence.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: refused with 400.")
    logprobs: Any = Field(None, description="Not supported: refused with 400.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Makes sampling reproducible.")
    user: Text | None = Field(None, description="End-user id; only its salted hash is logged.")
    top_k: int | None = Field(None, ge=1, le=MAX_COUNT,
                              description="genloop extra: sample from the k most likely tokens.")

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=self.stop, seed=self.seed,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)

    def unsupported(self) -> list[str]:
        """OpenAI fields set that genloop does not implement."""
        names = ["logit_bias", "logprobs", *self._extra_unsupported()]
        return [name for name in names if getattr(self, name) not in (None, False)]

    def _extra_unsupported(self) -> list[str]:
        return []


class CompletionRequest(_SamplingFields):
    model: Text = Field(description="Served model name (see GET /v1/models).")
    prompt: Text | list[Text] = Field(description=f"A prompt or a list of up to {MAX_PROMPTS} prompts.")
    suffix: Text | None = Field(None, description="Not supported: refused with 400.")
    max_tokens: int = Field(16, ge=1, le=MAX_COUNT, description="Most tokens to generate per choice.")
    echo: bool = Field(False, description="Not supported: refused with 400.")
    best_of: int | None = Field(None, description="Not supported: refused with 400.")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def _extra_unsupported(self) -> list[str]:
        return ["suffix", "echo", "best_of"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="Who wrote the message.")
    content: Text = Field(description="The message text.")
    name: Text | None = Field(None, description="Optional author name (ignored by the template).")


class ChatCompletionRequest(_SamplingFields):
    model: Text = Field(description="Served model name (see GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT, description="Most tokens to generate (legacy name).")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COUNT, description="Most tokens to generate.")
    tools: Any = Field(None, description="Not supported: refused with 400.")
    tool_choice: Any = Field(None, description="Not supported: refused with 400.")
    response_format: Any = Field(None, description="Not supported: refused with 400.")

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def _extra_unsupported(self) -> list[str]:
        return ["tools", "tool_choice", "response_format"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# The ids ``new_id`` hands out for a completion and a chat completion: what feedback may rate.
RESPONSE_ID = re.compile(r"^(?:cmpl|chatcmpl)-[0-9a-f]{24}$")

MAX_COMMENT_CHARS = 2000


def _response_id(value: str) -> str:
    """Refuse at once what cannot be a response of ours: such a rating could never join a completion."""
    if not RESPONSE_ID.fullmatch(value):
        raise ValueError("must be the id of a completion or chat completion this server answered "
                         "(cmpl-… or chatcmpl-…)")
    return value


class FeedbackRequest(BaseModel):
    """A caller's rating of a response: joined to the inference log by the response's id."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, AfterValidator(_response_id)] = Field(
        json_schema_extra={"pattern": RESPONSE_ID.pattern}, description="The id of the response rated.")
    # Strict: a JSON true must not pass as 1 (Literal alone would take it).
    rating: int = Field(strict=True, ge=-1, le=1,
                        description="1 good, 0 neutral, -1 bad; a later rating replaces this one.")
    comment: Text | None = Field(None, max_length=MAX_COMMENT_CHARS,
                                 description="Why; kept as the inference log keeps text (full, redacted or hashed).")


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    rating: int


def now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    model_version: str = Field(description="genloop extra: the registry version that answered.")


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    model_version: str = Field(description="genloop extra: the registry version that answered.")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    model_version: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=ERROR_TYPES.get(status, "server_error"),
                                           param=param, code=code)).model_dump()
