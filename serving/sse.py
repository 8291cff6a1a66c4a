"""Streamed answers as server-sent events, in OpenAI's chunk shapes.

A stream's choices arrive as ``(choice index, chunk or exception)`` pairs, interleaved as the
engine produces them (``OpenAIServer._stream``); the functions here turn them into OpenAI's
``text_completion`` or ``chat.completion.chunk`` events, add the usage event a caller asked for
with ``stream_options.include_usage`` (and each chunk's choice's usage so far with vLLM's
``continuous_usage_stats``), and frame them as SSE. The first event is awaited before
the response starts, so a request the engine refuses is a 4xx, not a 200 whose body carries an
error; later failures can only be told inside the stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from genloop.serving.api import APIError, stream_error
from genloop.serving.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
    error_body,
)

logger = logging.getLogger(__name__)

Choices = AsyncIterator[tuple[int, Any]]


async def sse_response(request_id: str, events: AsyncIterator[dict], headers: dict[str, str]) -> StreamingResponse:
    """Stream ``events`` once the first exists; an error after it becomes an error event, then ``[DONE]``."""
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
        except Exception:  # the 200 is sent: the error can only be told in the stream
            logger.exception("stream of request %s failed", request_id)
            yield f"data: {json.dumps(error_body(500, f'internal error; request id {request_id}'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _usage_event(body: Any, response_id: str, created: int, kind: str, usage: list[int],
                 model_version: str) -> dict | None:
    if not (body.stream_options and body.stream_options.include_usage):
        return None
    return {"id": response_id, "object": kind, "created": created, "model": body.model, "choices": [],
            "usage": Usage(prompt_tokens=usage[0], completion_tokens=usage[1], total_tokens=sum(usage)).model_dump(),
            "model_version": model_version}


def _continuous(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.continuous_usage_stats)


def _running_usage(totals: dict[int, list[int]], index: int, chunk: Any, opening: bool = False) -> Usage:
    """Choice ``index``'s usage so far, ``chunk``'s tokens counted (none for a chat choice's ``opening``
    role chunk): what vLLM's ``continuous_usage_stats`` puts in every chunk, each choice's own."""
    total = totals.setdefault(index, [0, 0])
    total[0] = chunk.prompt_tokens or total[0]
    if not opening:
        total[1] = chunk.completion_tokens if chunk.completion_tokens is not None else total[1] + len(chunk.token_ids)
    return Usage(prompt_tokens=total[0], completion_tokens=total[1], total_tokens=sum(total))


async def completion_events(choices: Choices, body: Any, response_id: str, created: int,
                            model_version: str, echoes: list[str]) -> AsyncIterator[dict]:
    """``echoes[i]`` goes before choice i's text (its prompt, with echo), with the prompt's logprobs."""
    usage = [0, 0]
    sent: dict[int, int] = {}  # characters of each choice's text sent so far: its next text_offset
    continuous, totals = _continuous(body), dict[int, list[int]]()
    async for index, chunk in choices:
        if isinstance(chunk, Exception):
            raise stream_error(chunk)
        if chunk.finish_reason is not None:
            usage[0] += chunk.prompt_tokens or 0
            usage[1] += chunk.completion_tokens or 0
        text, positions = chunk.text, chunk.logprobs or []
        if index not in sent:  # a choice's first chunk
            text, positions, sent[index] = echoes[index] + text, [*(chunk.prompt_logprobs or []), *positions], 0
        logprobs = None if body.logprobs is None else CompletionLogprobs.of(positions, sent[index])
        sent[index] += len(text)
        so_far = _running_usage(totals, index, chunk) if continuous else None
        yield CompletionResponse(
            id=response_id, created=created, model=body.model, model_version=model_version,
            choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=chunk.finish_reason)],
            usage=so_far,
        ).model_dump(exclude=None if so_far else {"usage"})
    event = _usage_event(body, response_id, created, "text_completion", usage, model_version)
    if event is not None:
        yield event


async def chat_events(choices: Choices, body: Any, response_id: str, created: int,
                      model_version: str) -> AsyncIterator[dict]:
    continuous, totals = _continuous(body), dict[int, list[int]]()

    def chunk_of(choice: ChatChunkChoice, chunk: Any, opening: bool = False) -> dict:
        so_far = _running_usage(totals, choice.index, chunk, opening) if continuous else None
        return ChatCompletionChunk(id=response_id, created=created, model=body.model, choices=[choice], usage=so_far,
                                   model_version=model_version).model_dump(exclude=None if so_far else {"usage"})

    usage = [0, 0]
    opened: set[int] = set()
    async for index, chunk in choices:
        if isinstance(chunk, Exception):
            raise stream_error(chunk)
        if index not in opened:  # OpenAI opens each choice with the role alone
            opened.add(index)
            yield chunk_of(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")), chunk,
                           opening=True)
        if chunk.finish_reason is not None:
            usage[0] += chunk.prompt_tokens or 0
            usage[1] += chunk.completion_tokens or 0
        yield chunk_of(ChatChunkChoice(index=index, delta=ChatDelta(content=chunk.text or None),
                                       logprobs=ChatLogprobs.of(chunk.logprobs or []) if body.logprobs else None,
                                       finish_reason=chunk.finish_reason), chunk)
    event = _usage_event(body, response_id, created, "chat.completion.chunk", usage, model_version)
    if event is not None:
        yield event
