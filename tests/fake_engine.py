"""FakeEngine: a test double of ``serving.engine.Engine`` for tests of the API layer only, and
``fake_api``: a replica over it with its ASGI app, in-process (no Ray Serve, no sockets, no model).

No model and no torch: the tokenizer is bytes (ids 0-255 are UTF-8 bytes; 256 is eos, spelled
``<|endoftext|>``), and the output is made up but deterministic, so the API's own rules (validation,
error shapes, SSE framing, usage, logprobs layout, n and seeds, the inference log) can be tested in
process, in milliseconds. Greedy output (temperature 0) is a function of the prompt's ids, sampled
output a function of the seed; either ends with eos as its ``EOS_AT + 1``-th token unless
``ignore_eos`` or ``min_tokens`` say otherwise. Logprobs are made up too, but consistent: a
token's logprob depends only on the token and its position, and the token itself heads its ``top``.
What only a real model shows (sampling over logits, penalties, response_format's constrained
decoding, batching) is tested against the HF engine (tests/unit/test_hf_engine.py).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from genloop.serving.api import build_api
from genloop.serving.app import OpenAIServer
from genloop.serving.engine import (
    Engine,
    EngineError,
    EngineOptions,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    Logprob,
    PositionLogprobs,
    SamplingParams,
)
from genloop.serving.settings import ServerSettings

EOS, EOS_TEXT = 256, "<|endoftext|>"
EOS_AT = 10  # tokens before eos, when nothing keeps it off
CONTEXT = 128
ALPHABET = list(b"abcdefghijklmnopqrstuvwxyz ")  # what the fake "generates": one character per token


class ByteTokenizer:
    """The part of a transformers tokenizer the Engine base class uses: ``__call__`` and ``decode``."""

    eos_token = EOS_TEXT

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int]) -> str:
        return "".join(EOS_TEXT * len(list(run)) if eos else bytes(run).decode(errors="replace")
                       for eos, run in groupby(ids, key=lambda token: token == EOS))


def token_text(token: int) -> str:
    return EOS_TEXT if token == EOS else bytes([token]).decode(errors="replace")


def position(token: int, at: int, top: int) -> PositionLogprobs:
    """Made-up logprobs of ``token`` at position ``at``: the token first in ``top``, then less likely letters."""
    logprob = -(1 + (token * 7 + at) % 10) / 10
    others = [t for t in ALPHABET if t != token][: max(top - 1, 0)]
    return PositionLogprobs(token_id=token, token=token_text(token), logprob=logprob, top=[
        Logprob(token_id=t, token=token_text(t), logprob=logprob - i) for i, t in enumerate([token, *others][:top])])


class FakeEngine(Engine):
    """Deterministic made-up completions over a byte tokenizer; see the module's docstring."""

    def __init__(self, model_path: str, model_version: str, options: EngineOptions | None = None):
        self._model_version = model_version
        self._loaded, self._active = False, 0

    @property
    def num_active(self) -> int:
        return self._active

    @property
    def num_waiting(self) -> int:
        return 0

    @property
    def supported_params(self) -> frozenset[str]:
        return super().supported_params - {"json_schema"}  # constrained decoding is the HF engine's

    async def load(self) -> None:
        self.tokenizer, self._context_length, self._vocab_size, self._loaded = ByteTokenizer(), CONTEXT, EOS + 1, True

    async def health(self) -> bool:
        return self._loaded

    async def close(self) -> None:
        self._loaded = False

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"] if add_generation_prompt else lines)

    async def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        """What the HF engine's ``_submit`` checks before it schedules a request, with its messages."""
        if not self._loaded:
            raise EngineError("engine is not loaded")
        params = request.params
        self.check_params(params)
        if params.n != 1:
            raise InvalidRequestError("the engine serves n=1; send n requests", param="n")
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            self.check_token_ids(ids, "prompt_token_ids")
        else:
            prompt = request.prompt or ""
            if len(prompt) > CONTEXT:  # every character is at least one byte, so one token at least
                raise InvalidRequestError(f"prompt of {len(prompt)} characters cannot fit the context of "
                                          f"{CONTEXT} tokens", param="prompt")
            ids = await self.tokenize(prompt)
            if not ids:
                raise InvalidRequestError("prompt is empty after tokenization", param="prompt")
        if len(ids) >= CONTEXT:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; the context holds {CONTEXT}", param="prompt")
        if params.max_tokens > CONTEXT - len(ids):
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                      f"context of {CONTEXT} tokens", param="max_tokens")
        return ids

    @staticmethod
    def _output(prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str, FinishReason]:
        """The tokens, the text (a stop string and what follows cut off) and the finish reason."""
        rng = random.Random(str(prompt_ids) if params.temperature == 0 else params.seed)
        eos_at = None if params.ignore_eos else max(EOS_AT, params.min_tokens)
        tokens: list[int] = []
        while len(tokens) < params.max_tokens:
            if len(tokens) == eos_at:
                return [*tokens, EOS], bytes(tokens).decode(), "stop"
            tokens.append(rng.choice(ALPHABET))
            text = bytes(tokens).decode()
            stop = next((s for s in params.stop if text.endswith(s)), None)  # one this token completed
            if stop is not None and len(tokens) >= params.min_tokens:
                return tokens, text[: -len(stop)], "stop"
        return tokens, bytes(tokens).decode(), "length"

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt_ids = await self._prompt_ids(request)
        params = request.params
        tokens, text, finish = self._output(prompt_ids, params)
        prompt_logprobs = None if params.prompt_logprobs is None else [
            PositionLogprobs(token_id=prompt_ids[0], token=token_text(prompt_ids[0]), logprob=None),
            *(position(t, i, params.prompt_logprobs) for i, t in enumerate(prompt_ids) if i)]
        self._active += 1
        try:
            for i, token in enumerate(tokens or [None]):  # max_tokens 0: one chunk, the prompt's logprobs
                last = i == len(tokens) - 1 or not tokens
                yield GenerationChunk(
                    text=text[i:i + 1] if token is not None else "", token_ids=[] if token is None else [token],
                    finish_reason=finish if last else None, prompt_tokens=len(prompt_ids),
                    completion_tokens=len(tokens) if last else None,
                    logprobs=None if params.logprobs is None or token is None else [
                        position(token, len(prompt_ids) + i, params.logprobs)],
                    prompt_logprobs=prompt_logprobs if i == 0 else None,
                    queue_seconds=0.0 if last else None,
                    inter_token_seconds=[0.001] * max(len(tokens) - 1, 0) if last else None)
                await asyncio.sleep(0)  # let other choices and requests run, as a real engine's steps do
        finally:
            self._active -= 1


@contextmanager
def fake_replica(**settings: Any) -> Iterator[OpenAIServer]:
    """A replica over a FakeEngine, ``settings`` overriding ServerSettings' fields; closed afterwards as
    Serve closes one. ``build_api(replica)`` is its ASGI app."""
    # The fake engine reads no files; the folder only has to exist, as a served model's must.
    settings = {"model_uri": str(Path(__file__).parent), "model_version": "7", "engine_class": FakeEngine,
                "log_flush_s": 0.1, **settings}
    replica = asyncio.run(OpenAIServer.create(ServerSettings(**settings)))
    try:
        yield replica
    finally:
        asyncio.run(replica.__del__())


@contextmanager
def fake_api(**settings: Any) -> Iterator[tuple[OpenAIServer, TestClient]]:
    """``fake_replica(**settings)`` and a TestClient on its API, the app's lifespan running."""
    with fake_replica(**settings) as replica, TestClient(build_api(replica)) as client:
        yield replica, client
