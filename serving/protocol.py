"""OpenAI's wire format for completions and chat: requests, responses, stream chunks, errors;
and genloop's feedback on a response.

Fields follow OpenAI's order, extras after: vLLM's sampling extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``) as vLLM defines them, and ``model_version``
on responses. ``null`` means the default wherever OpenAI's API allows it. Unknown fields are rejected
rather than ignored (vLLM ignores them with a warning), and OpenAI fields that genloop cannot honour
(tools, logit_bias, …) are accepted by the schema only to be refused with a 400 that names them:
a client must never believe a parameter took effect when it did not.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from genloop.serving.engine import MAX_COUNT, MAX_LOGPROBS, MAX_N, SEED_MAX, SEED_MIN, PositionLogprobs, SamplingParams
from genloop.training.errors import echo as quoted

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


def _null_means_default(field: FieldInfo | None) -> bool:
    """A field that takes ``null`` as its default: optional, with a default that is not itself None."""
    return field is not None and not field.is_required() and field.default is not None


# Schema keywords that describe a property rather than constrain its value.
_ANNOTATIONS = {"title", "description", "default", "examples", "deprecated"}


class _Request(BaseModel):
    """Base of every request body: unknown fields refused; ``null`` for a field with a default means
    that default, as in OpenAI's API (clients send ``"temperature": null`` for "unset"), and the
    published schema says so."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or not _null_means_default(cls.model_fields.get(k))}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        for name, prop in schema.get("properties", {}).items():
            if not _null_means_default(cls.model_fields.get(name)):
                continue
            if "anyOf" in prop:
                prop["anyOf"].append({"type": "null"})
            else:
                value = {k: prop.pop(k) for k in list(prop) if k not in _ANNOTATIONS}
                prop["anyOf"] = [value, {"type": "null"}]
        return schema


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with usage before [DONE].")
    continuous_usage_stats: bool = Field(
        False, description="vLLM extra: every chunk carries its choice's usage so far.")


class JsonSchemaFormat(_Request):
    """The JSON Schema a response must follow, named as OpenAI's response_format names it."""

    name: Text = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The schema's name.")
    description: Text | None = Field(None, description="What the response is for (not used for decoding).")
    schema_: dict[str, Any] | None = Field(None, alias="schema",
                                           description="A JSON Schema; absent, any JSON object.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced exactly.")


class ResponseFormat(_Request):
    """OpenAI's response_format, enforced by constrained decoding (as vLLM does): the output is JSON,
    valid against the schema, unless max_tokens runs out first (finish_reason "length")."""

    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text: free; json_object: any JSON object; json_schema: JSON valid against json_schema.")
    json_schema: JsonSchemaFormat | None = Field(None, description="The schema, with type json_schema (only).")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    def engine_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the engine enforces; None for free text."""
        if self.type == "text":
            return None
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return {"type": "object"}


class _SamplingFields(_Request):
    """The sampling fields both endpoints share."""

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=MAX_N, description=f"Choices per prompt (at most {MAX_N}).")
    stream: bool = Field(False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options; only with stream.")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 stop strings.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty on tokens already present.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty per earlier occurrence.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: refused with 400.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Makes sampling reproducible.")
    user: Text | None = Field(None, description="End-user id; only its salted hash is logged.")
    # vLLM's sampling extensions, as vLLM's OpenAI server takes them.
    top_k: int | None = Field(None, ge=-1, le=MAX_COUNT,
                              description="vLLM extra: sample from the k most likely tokens; 0 or -1 keeps all.")
    min_p: float = Field(0.0, ge=0.0, le=1.0,
                         description="vLLM extra: drop tokens less likely than min_p times the most likely one.")
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False,
                                      description="vLLM extra: >1 discourages tokens of the prompt and output.")
    min_tokens: int = Field(0, ge=0, le=MAX_COUNT,
                            description="vLLM extra: tokens to generate before eos or a stop string may end it.")
    ignore_eos: bool = Field(False, description="vLLM extra: go on past eos (fixed output lengths).")
    response_format: ResponseFormat | None = Field(
        None, description="JSON output, enforced while decoding (on completions too, as vLLM allows).")

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k if self.top_k and self.top_k > 0 else None, stop=self.stop,
                              seed=self.seed, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens,
                              ignore_eos=self.ignore_eos, **self._logprob_params(),
                              json_schema=self.response_format.engine_schema() if self.response_format else None)

    def _logprob_params(self) -> dict[str, int | None]:
        """The engine's logprobs and prompt_logprobs for this request's own logprob fields."""
        raise NotImplementedError

    def unsupported(self) -> list[str]:
        """OpenAI fields set that genloop does not implement: any value but null (and false), so that a
        falsy value that still asks for something (``{}``, ``0``) is refused too."""
        names = ["logit_bias", *self._extra_unsupported()]
        return [name for name in names if getattr(self, name) is not None and getattr(self, name) is not False]

    def _extra_unsupported(self) -> list[str]:
        return []


class CompletionRequest(_SamplingFields):
    model: Text = Field(description="Served model name (see GET /v1/models).")
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description=f"A prompt or a list of up to {MAX_PROMPTS} prompts, as text or as token ids (see /tokenize).")
    suffix: Text | None = Field(None, description="Not supported: refused with 400.")
    echo: bool = Field(False, description="Put the prompt before the text (and, with logprobs, its tokens' "
                       "logprobs before the completion's: the first token's is null).")
    max_tokens: int = Field(16, ge=0, le=MAX_COUNT, description="Most tokens to generate per choice; 0 only with "
                            "echo (to score the prompt, as lm-evaluation-harness does).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True, description=(
        f"Report each token's logprob and this many most likely tokens beside it (at most {MAX_LOGPROBS}, vLLM's "
        "limit; OpenAI's is 5)."))
    best_of: int | None = Field(None, ge=1, description="Only n (what it means when absent): more is refused "
                                "with 400.")

    @field_validator("best_of")
    @classmethod
    def _best_of_n_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        """best_of = n picks the best n of n: the choices themselves, which is what every request gets
        (benchmark clients send best_of: 1). Fewer than n cannot be picked from."""
        n = info.data.get("n")
        if value is None:
            return None
        if n is not None and value < n:
            raise ValueError(f"best_of ({value}) must be at least n ({n})")
        return None if value == n else value

    @field_validator("max_tokens")
    @classmethod
    def _nothing_only_to_echo(cls, value: int, info: ValidationInfo) -> int:
        """``max_tokens: 0`` generates nothing: only an echo of the prompt makes it a request."""
        if value == 0 and not info.data.get("echo"):
            raise ValueError("may be 0 only with echo: true")
        return value

    def _logprob_params(self) -> dict[str, int | None]:
        return {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, each a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [cast(list[int], prompt)]  # one prompt of token ids
        return cast("list[str] | list[list[int]]", prompt)

    def _extra_unsupported(self) -> list[str]:
        return ["suffix", "best_of"]


class TextPart(_Request):
    type: Literal["text"] = Field(description="Only text parts: genloop serves text models.")
    text: Text = Field(description="The part's text.")


class ChatMessage(_Request):
    role: Literal["developer", "system", "user", "assistant"] = Field(
        description="Who wrote the message; developer is OpenAI's newer name for system, rendered as system.")
    content: Text | list[TextPart] | None = Field(
        description="The message text, or a list of text parts (joined by newlines, as vLLM joins them); "
        "null only in an assistant message.")
    name: Text | None = Field(None, description="Optional author name (ignored by the template).")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """Name the part that is not text, rather than let the union's three failures speak."""
        if isinstance(value, list):
            for index, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"part {index} is of type {quoted(str(kind))!r}; genloop serves text only "
                                     "(parts of type 'text')")
        return value

    @field_validator("content")
    @classmethod
    def _null_only_from_the_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("must be text; only an assistant message may have null content")
        return value

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: its text, and ``developer`` as ``system`` (templates
        written before OpenAI renamed the role know only ``system``)."""
        if self.content is None or isinstance(self.content, str):
            text = self.content or ""
        else:
            text = "\n".join(part.text for part in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    model: Text = Field(description="Served model name (see GET /v1/models).")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT, description="Most tokens to generate (legacy name).")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COUNT, description="Most tokens to generate.")
    tools: Any = Field(None, description="Not supported: refused with 400.")
    tool_choice: Any = Field(None, description="Not supported: refused with 400.")
    logprobs: bool = Field(False, description="Report each generated token's logprob.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, strict=True,
                                     description="With logprobs: this many most likely tokens beside each.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def token_budget(self) -> int | None:
        """The most tokens the request allows; None when it sets no limit."""
        return self.max_completion_tokens or self.max_tokens

    def _logprob_params(self) -> dict[str, int | None]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None, "prompt_logprobs": None}

    def _extra_unsupported(self) -> list[str]:
        return ["tools", "tool_choice"]


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""

    model: Text | None = Field(None, description="Served model name; optional, as in vLLM.")
    prompt: Text | None = Field(None, description="Text to tokenize as a completion prompt; or give messages.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat to render and tokenize.")
    add_generation_prompt: bool = Field(True, description="With messages: open the assistant's turn, as chat "
                                        "completions do.")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    model: Text | None = Field(None, description="Served model name; optional, as in vLLM.")
    tokens: list[int] = Field(description="Token ids to turn into text.")


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


# JSON has no -inf (a token a response_format forbade): vLLM and OpenAI report this floor instead.
LOGPROB_FLOOR = -9999.0


def _floored(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class CompletionLogprobs(BaseModel):
    """OpenAI's logprobs of a completion choice: one entry per token in each list."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for a prompt's first token (with echo).")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="The most likely tokens and the chosen one, so up to logprobs + 1 of them.")
    text_offset: list[int] = Field(description="Where each token's text starts in the choice's text.")

    @classmethod
    def of(cls, positions: list[PositionLogprobs], start: int = 0) -> CompletionLogprobs:
        """The wire form of ``positions``, the first of them at character ``start`` of the text."""
        offsets = []
        for position in positions:
            offsets.append(start)
            start += len(position.token)
        return cls(
            tokens=[p.token for p in positions],
            token_logprobs=[None if p.logprob is None else _floored(p.logprob) for p in positions],
            top_logprobs=[None if p.logprob is None else {**{t.token: _floored(t.logprob) for t in p.top},
                                                          p.token: _floored(p.logprob)} for p in positions],
            text_offset=offsets,
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's text as UTF-8.")


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(description="The most likely tokens at this position, most likely first.")


class ChatLogprobs(BaseModel):
    """OpenAI's logprobs of a chat choice: one entry per generated token."""

    content: list[ChatTokenLogprob] | None

    @classmethod
    def of(cls, positions: list[PositionLogprobs]) -> ChatLogprobs:
        return cls(content=[ChatTokenLogprob(
            token=p.token, logprob=_floored(p.logprob or 0.0), bytes=list(p.token.encode()),
            top_logprobs=[ChatLogprob(token=t.token, logprob=_floored(t.logprob), bytes=list(t.token.encode()))
                          for t in p.top]) for p in positions])


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    code: int = Field(description="The HTTP status, as vLLM's server gives it (OpenAI's own codes are strings "
                      "or null).")


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


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=ERROR_TYPES.get(status, "server_error"),
                                           param=param, code=status)).model_dump()
