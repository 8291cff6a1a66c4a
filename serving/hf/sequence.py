"""One request's state in the HF engine, from submission to its last token.

The scheduler queues and admits it, the sampler reads its parameters and seeded generator, the
detokenizer grows its text, and the engine hands its results to the consumer's event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from itertools import pairwise
from typing import Any

import torch

from genloop.serving.engine import GenerationRequest, PositionLogprobs


class Sequence:
    """One request's state, shared by the submitting coroutine and the worker thread.

    The worker alone mutates it, except ``cancelled``, which the consumer sets (a plain attribute
    write is atomic under the GIL) and the worker reads at the next step. Results go to ``loop``,
    the consumer's event loop: into ``queue`` for a stream, ``future`` otherwise.
    """

    __slots__ = (
        "request_id", "prompt_ids", "params", "limit", "loop", "queue", "future", "generator", "output_ids",
        "counts", "seen", "text", "sent", "prefix_offset", "read_offset", "finish_reason", "cancelled", "submitted",
        "max_stop", "pending_text", "pending_ids", "matcher", "logprobs", "prompt_logprobs", "scheduled_at",
        "token_times",
    )

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], *, streaming: bool,
                 loop: asyncio.AbstractEventLoop, matcher: Any = None):
        self.request_id = request.request_id
        self.prompt_ids = prompt_ids
        self.params = request.params
        # Max tokens this sequence may generate: the request's max_tokens, never cut (a request whose
        # prompt + max_tokens would overrun the context is refused before it gets a Sequence).
        self.limit = request.params.max_tokens
        self.loop = loop
        self.queue: asyncio.Queue | None = asyncio.Queue() if streaming else None
        self.future: asyncio.Future | None = None if streaming else loop.create_future()
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed) if self.params.temperature > 0 else None
        self.output_ids: list[int] = []
        self.counts: torch.Tensor | None = None  # generated-token counts, only when penalties are set
        self.seen: torch.Tensor | None = None  # prompt and generated tokens, only with a repetition penalty
        self.text = ""  # decoded completion so far (stop string cut off once found)
        self.sent = 0  # characters of text already handed to the consumer
        self.prefix_offset = 0  # incremental detokenization window, as in vLLM / TGI
        self.read_offset = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.scheduled_at: float | None = None  # when the scheduler admitted it to the batch
        self.token_times: list[float] = []  # when each generated token was made: one step's clock reading per token
        self.pending_text = ""  # generated but not yet handed to the consumer
        self.pending_ids: list[int] = []
        self.max_stop = max((len(s) for s in self.params.stop), default=0)
        self.matcher = matcher  # llguidance's, for a response_format (serving.hf.structured)
        # One entry per generated token, filled only when asked (serving.hf.logprobs); the prompt's at prefill.
        self.logprobs: list[PositionLogprobs] | None = [] if self.params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs] | None = None

    @property
    def queue_seconds(self) -> float | None:
        """Arrival to admission into the batch; None until admitted."""
        return None if self.scheduled_at is None else self.scheduled_at - self.submitted

    @property
    def inter_token_seconds(self) -> list[float]:
        """The gaps between consecutive tokens, computed once the sequence is done rather than per step."""
        return [later - earlier for earlier, later in pairwise(self.token_times)]

    @property
    def live(self) -> bool:
        """Still generating for someone: neither finished nor cancelled."""
        return self.finish_reason is None and not self.cancelled
