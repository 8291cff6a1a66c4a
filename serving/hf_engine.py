"""HFEngine: a transformers model served with iteration-level (continuous) batching on CPU or GPU.

Static batching waits for a whole batch to finish before admitting anyone, so one long completion
holds 31 slots hostage and late arrivals queue for the full batch. Here the batch is re-formed at
every decoding step: new requests are prefilled apart from the running batch and their KV cache
joined to it before the next step; a sequence that finishes (eos, stop string, max_tokens, client gone)
leaves the batch at once. Each step feeds one token per active sequence through the model and hands
each consumer its token.

The running batch keeps all sequences right-aligned in one left-padded KV cache with a 2-D attention
mask and per-sequence position ids, exactly the layout ``model.generate`` uses for a left-padded
batch, so greedy output matches ``generate`` token for token. Joining pads the narrower parts on the
left and concatenates along the batch; compaction selects the live rows and drops leading columns
that are padding in every row, so the cache is only as wide as the longest live sequence. Both
rebuild the cache, so finished rows are compacted in batches, not one by one. Between rebuilds,
each layer's KV lives in a buffer with spare columns that a step writes in place (``_BatchLayer``)
instead of transformers' ``DynamicLayer``, which re-allocates the whole cache at every token: on
CPU that made 32-way decoding 20–40 % faster for a 1M- and a 12M-parameter GPT-2 (see
benchmarks/engine_throughput.py).

Streaming cost is paid per event, not per token: each chunk a consumer receives is a Python
object, an SSE event, a Ray Serve message to the proxy, an HTTP write and a parse in the client.
At 32 streams that overhead was as large as the decoding itself (genloop served 0.55× of one
``generate`` on 2 cores). So a step hands out about ``stream_events_per_step`` events: with a batch
of B sequences each consumer gets its tokens every ⌈B / stream_events_per_step⌉ steps, as one
chunk (vLLM's ``stream_interval`` groups tokens the same way, with a fixed count). Up to that many
concurrent streams see every token at once; first tokens and last chunks are never held.

Newcomers are prefilled shortest first, in groups of at most ``max_prefill_tokens`` padded
positions (vLLM's ``max_num_batched_tokens``), and each group's first tokens go out as soon as it
is computed; the groups then join the batch in one cache rebuild. One forward over a burst of 32
prompts of 16–64 tokens pads every row to 64, a third of it padding: in two length-sorted groups
the burst's median time to first token fell from 0.26 s to 0.14 s on 2 CPU cores (p95 0.26 → 0.25 s,
throughput unchanged; benchmarks/engine_throughput.py's model and prompts).

Concurrency: one dedicated worker thread owns the model and the cache and runs the loop; the event
loop only submits requests and receives results. A per-step ``asyncio.to_thread`` hop would put the
event loop's latency (HTTP parsing, other coroutines) between every two decoding steps and cost a
thread-pool round trip per token; the thread instead runs steps back to back (PyTorch releases the
GIL inside kernels, so the event loop stays responsive) and hands results back with one
``call_soon_threadsafe`` per step and event loop. Requests come in through a lock-protected deque.

Works for decoder-only models with full attention whose forward takes ``position_ids`` (GPT-2,
Llama and most others); sliding-window caches are not supported. ``n > 1`` is not an engine
concern: the API layer sends n requests.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from monitoring import metrics
from services.config import UserInputError
from serving.engine import (
    Engine,
    EngineError,
    EngineOverloaded,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    render_chat_template,
)
from training.models import context_length, load_model

logger = logging.getLogger(__name__)

# Prompts up to this many characters are tokenized on the event loop, longer ones in a thread. A chat
# turn tokenizes in less time than the hop to a thread and back; at this length the loop would stall
# about a millisecond for everyone, and the hop is a small share of the work (measured with the
# tiny preset's tokenizer).
_TOKENIZE_INLINE_CHARS = 4096


class _Sequence:
    """One request's state, shared by the submitting coroutine and the worker thread.

    The worker alone mutates it, except ``cancelled``, which the consumer sets (a plain attribute
    write is atomic under the GIL) and the worker reads at the next step.
    """

    __slots__ = (
        "request_id", "prompt_ids", "params", "limit", "loop", "queue", "future", "generator", "output_ids",
        "counts", "text", "sent", "prefix_offset", "read_offset", "finish_reason", "cancelled", "submitted",
        "first_token_at", "max_stop", "pending_text", "pending_ids",
    )

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], limit: int, streaming: bool):
        self.request_id = request.request_id
        self.prompt_ids = prompt_ids
        self.params = request.params
        self.limit = limit  # max tokens this sequence may generate: max_tokens capped by the context
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue | None = asyncio.Queue() if streaming else None
        self.future: asyncio.Future | None = None if streaming else self.loop.create_future()
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed) if self.params.temperature > 0 else None
        self.output_ids: list[int] = []
        self.counts: torch.Tensor | None = None  # generated-token counts, only when penalties are set
        self.text = ""  # decoded completion so far (stop string cut off once found)
        self.sent = 0  # characters of text already handed to the consumer
        self.prefix_offset = 0  # incremental detokenization window, as in vLLM / TGI
        self.read_offset = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.pending_text, self.pending_ids = "", []  # generated but not yet handed to the consumer
        self.max_stop = max((len(s) for s in self.params.stop), default=0)

    @property
    def live(self) -> bool:
        """Still generating for someone: neither finished nor cancelled."""
        return self.finish_reason is None and not self.cancelled


class _Rows(NamedTuple):
    """Rows of a batch and their state: the running batch, or a prefilled group about to join it."""

    seqs: list[_Sequence]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, heads, width, dim]
    mask: torch.Tensor  # [rows, width] 1 where the cache holds a real token
    positions: torch.Tensor  # [rows] position id of each row's next token
    last: torch.Tensor  # [rows] each row's latest token, the next step's input


class HFEngine(Engine):
    """A transformers causal LM behind the Engine interface, with continuous batching.

    Args:
        model_path: Hugging Face model folder (weights, config, tokenizer), as the registry stores it.
        model_version: registry version string reported with every response.
        device: torch device ("cpu", "cuda", "cuda:1").
        max_batch_size: most sequences decoded together; more wait in the queue.
        max_wait_ms: when idle, how long the first request waits for companions so they share one prefill.
        dtype: weights dtype ("float32", "bfloat16", "float16" or a torch.dtype); None keeps the saved one.
        int8: dynamic int8 quantisation of every Linear (GPT-2's Conv1D converted first); CPU only.
        max_queue_size: requests waiting beyond this are refused with EngineOverloaded (HTTP 429).
        stream_events_per_step: most stream chunks handed out per decoding step (tokens are grouped
            beyond it); at least ``max_batch_size`` streams every token.
        max_prefill_tokens: most padded prompt positions in one prefill forward; more newcomers are
            split by length (a longer prompt runs alone).
    """

    def __init__(
        self,
        model_path: str | Path,
        model_version: str,
        *,
        device: str = "cpu",
        max_batch_size: int = 32,
        max_wait_ms: float = 5,
        dtype: str | torch.dtype | None = None,
        int8: bool = False,
        max_queue_size: int = 1024,
        stream_events_per_step: int = 8,
        max_prefill_tokens: int = 1024,
    ):
        if min(max_batch_size, stream_events_per_step, max_prefill_tokens) < 1:
            raise ValueError("max_batch_size, stream_events_per_step and max_prefill_tokens must be at least 1")
        if int8 and not str(device).startswith("cpu"):
            raise ValueError("int8 dynamic quantisation runs on CPU only")
        self.model_path = Path(model_path)
        self._model_version = model_version
        self._batch_sizes = metrics.BATCH_SIZE.labels(model_version)  # observed once per decode step
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if isinstance(dtype, str) and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype")
        self.int8 = int8
        self.max_queue_size = max_queue_size
        self.stream_events_per_step = stream_events_per_step
        self.max_prefill_tokens = max_prefill_tokens
        self.model: Any = None
        self.tokenizer: Any = None
        self._context_length = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._cache_kwarg = "cache"
        self._waiting: deque[_Sequence] = deque()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        # The running batch, touched only by the worker thread.
        self._active: list[_Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 where the cache holds a real token
        self._positions: torch.Tensor | None = None  # [B] position id of each row's next token
        self._last: torch.Tensor | None = None  # [B] each row's latest token, the next step's input

    # -- Engine properties -------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        """Live sequences in the running batch: a finished or cancelled one stops counting at once,
        though its row may be computed, and ignored, until the batch is next compacted."""
        return sum(1 for s in self._active if s.live)

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not yet admitted to the batch."""
        return len(self._waiting)

    # -- life cycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        if self._closed:
            raise EngineError("engine is closed; create a new one")
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load_sync)
        self._thread = threading.Thread(target=self._run, name=f"hf-engine-{self._model_version}", daemon=True)
        self._thread.start()
        logger.info("HFEngine serving %s (version %s) on %s", self.model_path, self._model_version, self.device)

    def _load_sync(self) -> None:
        try:
            model = load_model(self.model_path)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except (UserInputError, OSError, ValueError) as exc:
            raise EngineError(f"cannot load model version {self._model_version}: {exc}") from exc
        if self.dtype is not None:
            model = model.to(self.dtype)
        model = _fused_activations(model.to(self.device).eval())
        if self.int8:
            model = _quantize_int8(model)
        self.model = model
        self._context_length = context_length(model.config)
        # No token is longer than the vocabulary's longest entry (for byte-level BPE, its bytes), so a
        # prompt with more characters than context × that length cannot fit: refused before the
        # tokenizer spends CPU on it.
        self._max_prompt_chars = self._context_length * max(map(len, self.tokenizer.get_vocab()))
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else model.config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        # transformers 5 renamed past_key_values to cache; accept either spelling of the installed one.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat_template(self.tokenizer, messages)

    async def health(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def close(self) -> None:
        self._closed = True
        thread = self._thread
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if thread is not None:
            await asyncio.to_thread(thread.join)
        self.model = None
        logger.info("HFEngine %s closed", self._model_version)

    # -- requests -----------------------------------------------------------------------------

    async def _tokenize(self, prompt: str) -> list[int]:
        """The prompt's ids; refused by length before any tokenizing, and off the event loop when long."""
        if len(prompt) > self._max_prompt_chars:
            raise InvalidRequestError(f"prompt of {len(prompt)} characters cannot fit the context of "
                                      f"{self._context_length} tokens", param="prompt")
        if len(prompt) <= _TOKENIZE_INLINE_CHARS:
            return self.tokenizer(prompt)["input_ids"]
        return (await asyncio.to_thread(self.tokenizer, prompt))["input_ids"]

    async def _submit(self, request: GenerationRequest, streaming: bool) -> _Sequence:
        if self._thread is None:
            raise EngineError("engine is not loaded")
        self.check_params(request.params)
        if request.params.n != 1:
            raise InvalidRequestError("the engine serves n=1; send n requests", param="n")
        if request.prompt_token_ids is not None:
            prompt_ids = list(request.prompt_token_ids)
            vocab = self.model.config.vocab_size
            if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
                raise InvalidRequestError(f"prompt_token_ids must lie in [0, {vocab})", param="prompt_token_ids")
        else:
            prompt_ids = await self._tokenize(request.prompt)
            if not prompt_ids:
                raise InvalidRequestError("prompt is empty after tokenization", param="prompt")
        room = self._context_length - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; the context holds {self._context_length}", param="prompt"
            )
        if request.params.max_tokens > room:  # as vLLM does: refuse rather than silently cut the answer short
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.params.max_tokens}) exceeds the "
                f"context of {self._context_length} tokens", param="max_tokens"
            )
        seq = _Sequence(request, prompt_ids, request.params.max_tokens, streaming)
        with self._wakeup:  # checked under the lock, so no request slips in after close() drained the queue
            if self._stopping:
                raise EngineError("engine is closed")
            if len(self._waiting) >= self.max_queue_size:
                raise EngineOverloaded(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(seq)
            self._wakeup.notify()
        return seq

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        seq = await self._submit(request, streaming=False)
        try:
            return await seq.future
        finally:
            if seq.finish_reason is None:
                seq.cancelled = True

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        seq = await self._submit(request, streaming=True)
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                text, tokens, finish = item
                if finish is None:
                    yield GenerationChunk.model_construct(text=text, token_ids=tokens, finish_reason=None)
                else:
                    yield GenerationChunk.model_construct(
                        text=text,
                        token_ids=tokens,
                        finish_reason=finish,
                        prompt_tokens=len(seq.prompt_ids),
                        completion_tokens=len(seq.output_ids),
                    )
                    return
        finally:
            if seq.finish_reason is None:
                seq.cancelled = True  # the worker drops it at the next step

    # -- worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():  # grad mode is thread-local: set it in the worker itself
            while True:
                newcomers: list[_Sequence] = []
                try:
                    self._drop_finished(slots_wanted=bool(self._waiting))  # freed slots are refilled at once
                    newcomers = self._take_newcomers()
                    if newcomers is None:
                        break
                    if newcomers:
                        self._prefill(newcomers)
                        self._drop_finished(slots_wanted=False)  # a newcomer may finish on its first token
                    if self._active:
                        self._decode_step()
                except Exception as exc:  # noqa: BLE001 - a bug or OOM must fail requests, not kill the loop
                    logger.exception("HFEngine step failed; failing %d requests", len(self._active) + len(newcomers))
                    self._fail([*self._active, *newcomers], f"generation failed: {exc}")
                    self._reset_batch()
        with self._wakeup:
            leftovers = [*self._active, *self._waiting]
            self._waiting.clear()
        self._fail(leftovers, "engine closed")
        self._reset_batch()

    def _take_newcomers(self) -> list[_Sequence] | None:
        """Requests to admit at this step; blocks while idle; None once the engine is closing."""
        with self._wakeup:
            if not self._active:
                while not self._waiting and not self._stopping:
                    self._wakeup.wait()
                # Idle: let companions of the first request arrive so they share one prefill.
                deadline = time.perf_counter() + self.max_wait
                while len(self._waiting) < self.max_batch_size and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._wakeup.wait(left)
            if self._stopping:
                return None
            room = self.max_batch_size - len(self._active)
            taken = []
            while self._waiting and len(taken) < room:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            return taken

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Prefill the newcomers group by group, hand out each group's first tokens as soon as they
        exist, then join all of them to the running batch in one cache rebuild."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        parts = []
        for group in prefill_groups(seqs, self.max_prefill_tokens):
            width = max(len(s.prompt_ids) for s in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, seq in enumerate(group):
                ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
                mask[row, width - len(seq.prompt_ids):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded batch
            cache = DynamicCache()
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{self._cache_kwarg: cache},
            ).logits[:, -1, :]
            tokens = self._sample(logits, group)
            self._emit(group, tokens)
            lengths = torch.tensor([len(s.prompt_ids) for s in group], device=self.device)
            parts.append(_Rows(group, [(layer.keys, layer.values) for layer in cache.layers], mask, lengths,
                               torch.tensor(tokens, device=self.device)))
        self._join(parts)

    def _join(self, parts: list[_Rows]) -> None:
        """Make the running batch and ``parts`` one batch: each left-padded to the widest, then concatenated."""
        if self._active:
            running = _Rows(self._active, [(layer.keys, layer.values) for layer in self._cache.layers],
                            self._mask, self._positions, self._last)
            parts = [running, *parts]
        width = max(part.mask.shape[1] for part in parts)
        self._cache = _batch_cache([
            tuple(torch.cat([_pad_left(part.layers[layer][kv], width - part.mask.shape[1]) for part in parts])
                  for kv in (0, 1))
            for layer in range(len(parts[0].layers))
        ])
        self._mask = torch.cat([_pad_left(part.mask, width - part.mask.shape[1], dim=1) for part in parts])
        self._positions = torch.cat([part.positions for part in parts])
        self._last = torch.cat([part.last for part in parts])
        self._active = [seq for part in parts for seq in part.seqs]

    def _drop_finished(self, slots_wanted: bool) -> None:
        """Remove finished and cancelled rows, then trim columns that are padding in every row.

        Removing rebuilds the whole cache, about 10 ms for 32 rows of the 12M GPT-2 on 2 CPU cores,
        and with staggered finishes it came at nearly every step: 21 % of the wall time of 32
        requests of 33–64 tokens. A step costs far less per row, so a dead row stays in the batch,
        computed and ignored, until a quarter of the rows are dead, all are, or a waiting request
        wants the slot: those 32 requests went from 941–1020 to 1040–1113 tokens/s (3 runs each).
        """
        keep = [i for i, s in enumerate(self._active) if s.live]
        dead = len(self._active) - len(keep)
        if dead == 0:
            return
        if not keep:
            self._reset_batch()
            return
        if not slots_wanted and dead * 4 < len(self._active):
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(0).int().argmax())  # first column some row still uses
        self._cache = _batch_cache([
            (layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
            for layer in self._cache.layers
        ])
        self._mask = mask[:, start:]
        self._positions = self._positions.index_select(0, index)
        self._last = self._last.index_select(0, index)
        self._active = [self._active[i] for i in keep]

    def _decode_step(self) -> None:
        rows = len(self._active)
        self._batch_sizes.observe(rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=1)
        logits = self.model(
            input_ids=self._last[:, None], attention_mask=self._mask, position_ids=self._positions[:, None],
            use_cache=True, **{self._cache_kwarg: self._cache},
        ).logits[:, -1, :]
        tokens = self._sample(logits, self._active)
        # A dead row that ended at the context limit keeps stepping until compaction: hold its position.
        self._positions = (self._positions + 1).clamp(max=self._context_length - 1)
        self._last = torch.tensor(tokens, device=self.device)
        self._emit(self._active, tokens)

    def _reset_batch(self) -> None:
        self._active, self._cache, self._mask, self._positions, self._last = [], None, None, None, None

    # -- sampling -----------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """One token per row: penalties, then greedy or temperature / top-k / top-p sampling.

        Greedy rows are one vectorised argmax. Sampled rows are filtered together; each row then
        draws a single uniform from its own seeded generator, so a seeded request samples the same
        tokens whatever else shares the batch.
        """
        logits = logits.float()
        penalised = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
        for i in penalised:
            counts = seqs[i].counts
            if counts is not None:
                p = seqs[i].params
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        tokens = logits.argmax(-1).tolist()
        sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        if sampled:
            for i, token in zip(sampled, self._sample_rows(logits[sampled], [seqs[i] for i in sampled])):
                tokens[i] = token
        for i in penalised:
            seq = seqs[i]
            if seq.counts is None:
                seq.counts = torch.zeros(logits.shape[-1], device=logits.device)
            seq.counts[tokens[i]] += 1
        return tokens

    def _sample_rows(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        device = logits.device
        temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
        ordered, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
        ranks = torch.arange(ordered.shape[-1], device=device)
        top_k = torch.tensor([s.params.top_k or ordered.shape[-1] for s in seqs], device=device)
        ordered = ordered.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
        probs = ordered.softmax(-1)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
        before = probs.cumsum(-1) - probs  # mass strictly ahead of each token; the first always stays
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)
        cumulative = probs.cumsum(-1)
        draws = torch.stack([torch.rand((), generator=s.generator) for s in seqs]).to(device)
        picked = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True)
        picked = picked.clamp(max=ordered.shape[-1] - 1)
        return order.gather(1, picked).squeeze(1).tolist()

    # -- output -------------------------------------------------------------------------------

    def _emit(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        """Record each row's token, detokenize, check stop conditions, and hand results to consumers.

        A stream gets its pending tokens as one chunk when they reach ``group`` (see the module
        docstring), on its first token, and when it finishes. Rows admitted together flush on the
        same steps; staggering them (row index as the phase) evened out the chunks per step but cost
        about 7 % of throughput over Serve at 32 streams (A/B, 5–6 runs each): a burst is handled in
        one wake-up of the event loop and leaves the steps between undisturbed.
        """
        now = time.perf_counter()
        group = -(-len(seqs) // self.stream_events_per_step)
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, token in zip(seqs, tokens):
            if not seq.live:
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.output_ids.append(token)
            eos = token in self._eos_ids
            delta = self._advance_text(seq, final=eos or len(seq.output_ids) >= seq.limit)
            if seq.finish_reason is None and (eos or len(seq.output_ids) >= seq.limit):
                seq.finish_reason = "stop" if eos else "length"
            if seq.queue is not None:
                seq.pending_text += delta
                seq.pending_ids.append(token)
                if seq.finish_reason is None and len(seq.output_ids) > 1 and len(seq.pending_ids) < group:
                    continue
                deliveries.setdefault(seq.loop, []).append((seq, (seq.pending_text, seq.pending_ids, seq.finish_reason)))
                seq.pending_text, seq.pending_ids = "", []
            elif seq.finish_reason is not None:
                deliveries.setdefault(seq.loop, []).append((seq, self._result(seq, now)))
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                for seq, _ in items:
                    seq.cancelled = True

    def _advance_text(self, seq: _Sequence, final: bool) -> str:
        """Decode the newest token; return the text safe to send (no partial character or stop string).

        Decoding only a window of recent tokens (vLLM's / TGI's incremental detokenization) keeps
        the cost per token constant. A multi-byte character split across tokens decodes to U+FFFD
        until its last byte arrives, so it waits, unless this is the last token.
        """
        ids = seq.output_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            seq.text += full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        if not seq.max_stop:
            return self._flush(seq)
        hits = [i for i in (seq.text.find(s, seq.sent) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            seq.finish_reason = "stop"
            return self._flush(seq)
        if final:
            return self._flush(seq)
        # Hold back a tail that could still grow into a stop string.
        held = max(
            (k for s in seq.params.stop for k in range(min(len(s) - 1, len(seq.text)), 0, -1)
             if seq.text.endswith(s[:k])),
            default=0,
        )
        end = max(seq.sent, len(seq.text) - held)
        delta, seq.sent = seq.text[seq.sent:end], end
        return delta

    @staticmethod
    def _flush(seq: _Sequence) -> str:
        delta, seq.sent = seq.text[seq.sent:], len(seq.text)
        return delta

    @staticmethod
    def _result(seq: _Sequence, now: float) -> GenerationResult:
        return GenerationResult(
            text=seq.text,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            ttft_seconds=seq.first_token_at - seq.submitted,
            total_seconds=now - seq.submitted,
        )

    def _fail(self, seqs: list[_Sequence], message: str) -> None:
        """End unfinished sequences with an EngineError each (one instance per consumer: tracebacks differ)."""
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for seq in dict.fromkeys(seqs):  # a newcomer may already sit in the active batch
            if seq.finish_reason is None:
                deliveries.setdefault(seq.loop, []).append((seq, EngineError(message)))
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                pass


def prefill_groups(seqs: list[_Sequence], max_tokens: int) -> list[list[_Sequence]]:
    """``seqs`` shortest prompt first, cut so that no group's rows × longest prompt exceeds ``max_tokens``."""
    groups: list[list[_Sequence]] = []
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        if groups and (len(groups[-1]) + 1) * len(seq.prompt_ids) <= max_tokens:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups


def _deliver(items: list) -> None:
    """Runs on the consumer's event loop: pass each payload to its stream queue or result future."""
    for seq, payload in items:
        if seq.queue is not None:
            seq.queue.put_nowait(payload)
        elif not seq.future.done():
            if isinstance(payload, BaseException):
                seq.future.set_exception(payload)
            else:
                seq.future.set_result(payload)


class _BatchLayer(DynamicLayer):
    """One layer's KV for the running batch, in a buffer with spare columns.

    ``DynamicLayer`` grows by concatenation, re-allocating and copying the whole cache at every
    step; with 32 sequences that is megabytes per layer per token, fresh pages the allocator must
    fault in (worst on a non-main thread, whose malloc arena hands large blocks back to the OS).
    Writing the new column in place and exposing a view of the used part makes a step's cache cost
    proportional to the new token only; the buffer grows by half again when full.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.length = keys.shape[2]
        self._keys = self._allocate(keys)
        self._values = self._allocate(values)
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        self.device, self.is_initialized = keys.device, True

    def _allocate(self, used: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = used.shape
        buffer = used.new_empty((batch, heads, length + max(32, length // 2), dim))
        buffer[:, :, :length] = used
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[2]
        if self.length + new > self._keys.shape[2]:
            self._keys, self._values = self._allocate(self.keys), self._allocate(self.values)
        self._keys[:, :, self.length : self.length + new] = key_states
        self._values[:, :, self.length : self.length + new] = value_states
        self.length += new
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _batch_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache (what the model code expects) whose layers are in-place ``_BatchLayer`` buffers."""
    cache = DynamicCache()
    cache.layers = [_BatchLayer(keys, values) for keys, values in layers]
    cache.layer_class_to_replicate = None
    return cache


def _pad_left(tensor: torch.Tensor, count: int, dim: int = 2) -> torch.Tensor:
    """Prepend ``count`` zeros along ``dim`` (the sequence axis: 2 for KV tensors, 1 for masks)."""
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _fused_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's ``NewGELUActivation`` for ``GELUTanh``: the same tanh-approximated GELU, as one
    fused torch kernel instead of six elementwise ops (outputs agree to float rounding, 2e-7 in
    float32). A 32-row decoding step of the 12M GPT-2 on 2 CPU cores took 11 % less time."""
    from transformers.activations import GELUTanh, NewGELUActivation

    return _replace_modules(model, NewGELUActivation, lambda _: GELUTanh())


def _replace_modules(model: torch.nn.Module, kind: type, replacement) -> torch.nn.Module:
    """Put ``replacement(child)`` in place of every submodule of type ``kind``; returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, replacement(child))
    return model


def _quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every nn.Linear; GPT-2's Conv1D layers are turned into Linear first.

    Conv1D computes ``x @ W + b`` with W stored (in, out); an nn.Linear with the transposed weight is
    the same function, so after conversion quantize_dynamic covers attention and MLP projections of
    GPT-2 as well as Llama. Embeddings stay float. torch.ao.quantization is deprecated in favour of
    torchao but still ships with torch 2.13; its deprecation warnings are silenced here.
    """
    from transformers.pytorch_utils import Conv1D

    def as_linear(conv: Conv1D) -> torch.nn.Linear:
        linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1], dtype=conv.weight.dtype)
        linear.weight.data = conv.weight.data.t().contiguous()
        linear.bias.data = conv.bias.data
        return linear

    _replace_modules(model, Conv1D, as_linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
