"""HFEngine: a transformers model served with iteration-level (continuous) batching on CPU or GPU.

Static batching waits for a whole batch to finish before admitting anyone, so one long completion
holds 31 slots hostage and late arrivals queue for the full batch. Here the batch is re-formed at
every decoding step: new requests are prefilled apart from the running batch and their KV cache
joined to it before the next step; a sequence that finishes (eos, stop string, max_tokens, client gone)
leaves the batch at once. Each step feeds one token per active sequence through the model and hands
each consumer its token. This module is the loop that ties the parts together and runs the model's
forward passes; the scheduler decides which requests run, ``kv_batch`` lays out their cache, the
sampler picks tokens (among those a response_format allows: ``structured``), ``logprobs`` reports
them for the requests that ask, and the detokenizer turns them into text.

Streaming cost is paid per event, not per token: each chunk a consumer receives is a Python
object, an SSE event, a Ray Serve message to the proxy, an HTTP write and a parse in the client.
At 32 streams that overhead was as large as the decoding itself (genloop served 0.55× of one
``generate`` on 2 cores). So a step hands out about ``stream_events_per_step`` events: with a batch
of B sequences each consumer gets its tokens every ⌈B / stream_events_per_step⌉ steps, as one
chunk (vLLM's ``stream_interval`` groups tokens the same way, with a fixed count). Up to that many
concurrent streams see every token at once; first tokens and last chunks are never held.

Concurrency: one dedicated worker thread owns the model and the cache and runs the loop; the event
loop only submits requests and receives results. A per-step ``asyncio.to_thread`` hop would put the
event loop's latency (HTTP parsing, other coroutines) between every two decoding steps and cost a
thread-pool round trip per token; the thread instead runs steps back to back (PyTorch releases the
GIL inside kernels, so the event loop stays responsive) and hands results back with one
``call_soon_threadsafe`` per step and event loop. Requests come in through the scheduler's
lock-protected deque.

Works for decoder-only models with full attention whose forward takes ``position_ids`` (GPT-2,
Llama and most others); sliding-window caches are not supported. ``n > 1`` is not an engine
concern: the API layer sends n requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, DynamicCache

from genloop.monitoring import metrics
from genloop.serving.engine import (
    Engine,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    PositionLogprobs,
)
from genloop.serving.hf.detokenizer import advance_text
from genloop.serving.hf.kv_batch import Rows, compact, join
from genloop.serving.hf.logprobs import StepLogprobs, TokenTexts, prompt_entries
from genloop.serving.hf.model_prep import fuse_activations, quantize_int8
from genloop.serving.hf.options import HFEngineOptions
from genloop.serving.hf.sampler import sample
from genloop.serving.hf.scheduler import Scheduler, prefill_groups, rows_to_keep
from genloop.serving.hf.sequence import Sequence
from genloop.serving.hf.structured import Grammars, advance, mask
from genloop.training.errors import UserInputError
from genloop.training.models import context_length, load_model

logger = logging.getLogger(__name__)


class HFEngine(Engine):
    """A transformers causal LM behind the Engine interface, with continuous batching.

    Args:
        model_path: Hugging Face model folder (weights, config, tokenizer), as the registry stores it.
        model_version: registry version string reported with every response.
        options: ``HFEngineOptions`` (device, batch size, dtype, ...); keyword ``fields`` override
            single ones, e.g. ``HFEngine(path, "1", max_batch_size=4)``.
    """

    Options = HFEngineOptions

    def __init__(self, model_path: str | Path, model_version: str, options: HFEngineOptions | None = None,
                 **fields: Any):
        self.options = self.resolve_options(options, fields)
        self.model_path = Path(model_path)
        self._model_version = model_version
        self._batch_sizes = metrics.BATCH_SIZE.labels(model_version)  # observed once per decode step
        self.device = torch.device(self.options.device)
        self.model: Any = None
        self.tokenizer: Any = None
        self._context_length = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._cache_kwarg = "cache"
        self._scheduler = Scheduler(self.options)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._batch: Rows | None = None  # the running batch, touched only by the worker thread
        self._grammars: Grammars | None = None  # built at the first response_format
        self._texts: TokenTexts | None = None  # set by load(): token texts for logprobs

    # -- Engine properties -------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        """Live sequences in the running batch: a finished or cancelled one stops counting at once,
        though its row may be computed, and ignored, until the batch is next compacted."""
        return sum(1 for s in self._active if s.live)

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not yet admitted to the batch."""
        return self._scheduler.num_waiting

    @property
    def _active(self) -> list[Sequence]:
        """The running batch's sequences, dead rows not yet compacted away included."""
        batch = self._batch
        return batch.seqs if batch is not None else []

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
        if self.options.dtype is not None:
            model = model.to(getattr(torch, self.options.dtype))
        model = fuse_activations(model.to(self.device).eval())
        if self.options.int8:
            model = quantize_int8(model)
        self.model = model
        self._context_length = context_length(model.config)
        # No token is longer than the vocabulary's longest entry (for byte-level BPE, its bytes), so a
        # prompt with more characters than context × that length cannot fit: refused before the
        # tokenizer spends CPU on it.
        vocab = self.tokenizer.get_vocab()
        self._max_prompt_chars = self._context_length * max(map(len, vocab))
        self._vocab_size = max(vocab.values()) + 1
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else model.config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        # transformers 5 renamed past_key_values to cache; accept either spelling of the installed one.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._texts = TokenTexts(self.tokenizer)

    async def health(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._scheduler.stopping

    async def close(self) -> None:
        self._closed = True
        thread = self._thread
        self._scheduler.stop()
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
        return await self.tokenize(prompt)

    def _matcher(self, schema: dict[str, Any]) -> Any:
        """A matcher for a response_format's schema, run in a thread: a large schema takes a while to
        compile, and so does the tokenizer's view for the grammars, built at the first."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size, self._eos_ids)
        return self._grammars.matcher(schema)

    async def _submit(self, request: GenerationRequest, streaming: bool) -> Sequence:
        if self._thread is None:
            raise EngineError("engine is not loaded")
        self.check_params(request.params)
        if request.params.n != 1:
            raise InvalidRequestError("the engine serves n=1; send n requests", param="n")
        if request.prompt_token_ids is not None:
            prompt_ids = list(request.prompt_token_ids)
            self.check_token_ids(prompt_ids, "prompt_token_ids")
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
        schema = request.params.json_schema
        matcher = None if schema is None else await asyncio.to_thread(self._matcher, schema)
        seq = Sequence(request, prompt_ids, streaming=streaming, loop=asyncio.get_running_loop(), matcher=matcher)
        self._scheduler.add(seq)
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
        received = 0  # tokens handed out so far; the worker fills seq.logprobs before it hands out a token
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                text, tokens, finish = item
                reported: dict[str, Any] = {}
                if seq.logprobs is not None:
                    reported["logprobs"] = seq.logprobs[received:received + len(tokens)]
                if not received and seq.prompt_logprobs is not None:
                    reported["prompt_logprobs"] = seq.prompt_logprobs
                received += len(tokens)
                if finish is None:
                    yield GenerationChunk.model_construct(text=text, token_ids=tokens, finish_reason=None,
                                                          prompt_tokens=len(seq.prompt_ids), **reported)
                else:
                    yield GenerationChunk.model_construct(
                        text=text,
                        token_ids=tokens,
                        finish_reason=finish,
                        prompt_tokens=len(seq.prompt_ids),
                        completion_tokens=len(seq.output_ids),
                        queue_seconds=seq.queue_seconds,
                        inter_token_seconds=seq.inter_token_seconds,
                        **reported,
                    )
                    return
        finally:
            if seq.finish_reason is None:
                seq.cancelled = True  # the worker drops it at the next step

    # -- worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():  # grad mode is thread-local: set it in the worker itself
            while True:
                newcomers: list[Sequence] = []
                try:
                    # Freed slots are refilled at once.
                    self._drop_finished(slots_wanted=self._scheduler.num_waiting > 0)
                    newcomers = self._scheduler.take_newcomers(running=len(self._active))
                    if newcomers is None:
                        break
                    if newcomers:
                        self._prefill(newcomers)
                        self._drop_finished(slots_wanted=False)  # a newcomer may finish on its first token
                    if self._batch is not None:
                        self._decode_step(self._batch)
                except Exception as exc:  # a bug or OOM must fail requests, not kill the loop
                    logger.exception("HFEngine step failed; failing %d requests", len(self._active) + len(newcomers))
                    self._fail([*self._active, *newcomers], f"generation failed: {exc}")
                    self._batch = None
        self._fail([*self._active, *self._scheduler.drain()], "engine closed")
        self._batch = None

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill the newcomers group by group, hand out each group's first tokens as soon as they
        exist, then join all of them to the running batch in one cache rebuild."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        parts = [] if self._batch is None else [self._batch]
        for group in prefill_groups(seqs, self.options.max_prefill_tokens):
            width = max(len(s.prompt_ids) for s in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, seq in enumerate(group):
                ids[row, width - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
                mask[row, width - len(seq.prompt_ids):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded batch
            cache = DynamicCache()
            # Every position's logits when a row wants its prompt's logprobs (bounded by max_prefill_tokens).
            scoring = [row for row, seq in enumerate(group) if seq.params.prompt_logprobs is not None]
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=0 if scoring else 1, **{self._cache_kwarg: cache},
            ).logits
            for row in scoring:
                seq = group[row]
                seq.prompt_logprobs = prompt_entries(logits[row, width - len(seq.prompt_ids):], seq.prompt_ids,
                                                     seq.params.prompt_logprobs or 0, self._texts)
            tokens, entries = self._sample(logits[:, -1, :], group)
            self._emit(group, tokens, entries)
            lengths = torch.tensor([len(s.prompt_ids) for s in group], device=self.device)
            parts.append(Rows(group, cache, mask, lengths, torch.tensor(tokens, device=self.device)))
        self._batch = join(parts)

    def _drop_finished(self, slots_wanted: bool) -> None:
        """Remove finished and cancelled rows, when the scheduler's ``rows_to_keep`` says it is worth a rebuild."""
        if self._batch is None:
            return
        keep = rows_to_keep(self._batch.seqs, slots_wanted)
        if keep is not None:
            self._batch = compact(self._batch, keep) if keep else None

    def _decode_step(self, batch: Rows) -> None:
        rows = len(batch.seqs)
        self._batch_sizes.observe(rows)
        mask = torch.cat([batch.mask, batch.mask.new_ones((rows, 1))], dim=1)
        logits = self.model(
            input_ids=batch.last[:, None], attention_mask=mask, position_ids=batch.positions[:, None],
            use_cache=True, **{self._cache_kwarg: batch.cache},
        ).logits[:, -1, :]
        tokens, entries = self._sample(logits, batch.seqs)
        # A dead row that ended at the context limit keeps stepping until compaction: hold its position.
        positions = (batch.positions + 1).clamp(max=self._context_length - 1)
        self._batch = batch._replace(mask=mask, positions=positions, last=torch.tensor(tokens, device=self.device))
        self._emit(batch.seqs, tokens, entries)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], dict[int, PositionLogprobs]]:
        """Each row's next token, among those its response_format allows, and the logprobs of the rows
        that asked (row index → entry)."""
        mask(logits, seqs)
        step = StepLogprobs(logits, seqs)
        tokens = sample(logits, seqs, self._eos_ids)
        return tokens, step.entries(tokens, self._texts)

    # -- output -------------------------------------------------------------------------------

    def _emit(self, seqs: list[Sequence], tokens: list[int], entries: dict[int, PositionLogprobs]) -> None:
        """Record each row's token (and its logprobs ``entries[row]`` if asked), detokenize, check stop
        conditions, and hand results to consumers. A row with max_tokens 0 takes no token: it asked for
        its prompt's logprobs alone, and finishes with "length".

        A stream gets its pending tokens as one chunk when they reach ``group`` (see the module
        docstring), on its first token, and when it finishes. Rows admitted together flush on the
        same steps; staggering them (row index as the phase) evened out the chunks per step but cost
        about 7 % of throughput over Serve at 32 streams (A/B, 5–6 runs each): a burst is handled in
        one wake-up of the event loop and leaves the steps between undisturbed.
        """
        now = time.perf_counter()
        group = -(-len(seqs) // self.options.stream_events_per_step)
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for row, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if not seq.live:
                continue
            generated, complete = seq.limit > 0, False
            if generated:
                seq.token_times.append(now)
                seq.output_ids.append(token)
                complete = advance(seq, token)  # a response_format's JSON is complete: it ends here
                if seq.logprobs is not None:
                    seq.logprobs.append(entries[row])
            stops = complete or (generated and token in self._eos_ids and not seq.params.ignore_eos)
            delta = advance_text(self.tokenizer, seq, final=stops or len(seq.output_ids) >= seq.limit)
            if seq.finish_reason is None and (stops or len(seq.output_ids) >= seq.limit):
                seq.finish_reason = "stop" if stops else "length"
            if seq.queue is not None:
                seq.pending_text += delta
                if generated:
                    seq.pending_ids.append(token)
                if seq.finish_reason is None and len(seq.output_ids) > 1 and len(seq.pending_ids) < group:
                    continue
                chunk = (seq.pending_text, seq.pending_ids, seq.finish_reason)
                deliveries.setdefault(seq.loop, []).append((seq, chunk))
                seq.pending_text, seq.pending_ids = "", []
            elif seq.finish_reason is not None:
                deliveries.setdefault(seq.loop, []).append((seq, _result(seq, now)))
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                for seq, _ in items:
                    seq.cancelled = True

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        """End unfinished sequences with an EngineError each (one instance per consumer: tracebacks differ)."""
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for seq in dict.fromkeys(seqs):  # a newcomer may already sit in the active batch
            if seq.finish_reason is None:
                deliveries.setdefault(seq.loop, []).append((seq, EngineError(message)))
        for loop, items in deliveries.items():
            with contextlib.suppress(RuntimeError):  # the consumer's event loop is closed: nobody is listening
                loop.call_soon_threadsafe(_deliver, items)


def _result(seq: Sequence, now: float) -> GenerationResult:
    return GenerationResult(
        text=seq.text,
        finish_reason=seq.finish_reason,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=len(seq.output_ids),
        ttft_seconds=(seq.token_times[0] if seq.token_times else now) - seq.submitted,
        total_seconds=now - seq.submitted,
        queue_seconds=seq.queue_seconds,
        inter_token_seconds=seq.inter_token_seconds,
        logprobs=seq.logprobs,
        prompt_logprobs=seq.prompt_logprobs,
    )


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
