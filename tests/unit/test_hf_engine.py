"""HFEngine on a tiny GPT-2 built in the test: continuous batching must not change what greedy decoding says.

The reference is ``model.generate(do_sample=False)`` on each prompt alone. The engine runs the same
weights with left padding, KV merges and trims as requests join and leave; in float32 a padded
batch may differ from an unpadded one in the last bits, and an untrained model's nearly flat logits
turn that into a different argmax now and then, so both sides run in float64, where only a bug
can make them disagree.

The parts that need no model (the scheduler's rules, the batch's cache layout, the detokenizer's
stop strings, the options) are tested on their own at the end.
"""

from __future__ import annotations

import asyncio
import json
import pydoc_data.topics
import threading
import time

import jsonschema
import pytest
import torch
from pydantic import ValidationError
from transformers import DynamicCache
from transformers.activations import NewGELUActivation

from genloop.serving.engine import (
    EngineError,
    EngineOverloaded,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from genloop.serving.hf.detokenizer import advance_text
from genloop.serving.hf.engine import HFEngine
from genloop.serving.hf.kv_batch import Rows, compact, join
from genloop.serving.hf.options import HFEngineOptions
from genloop.serving.hf.scheduler import Scheduler, prefill_groups, rows_to_keep
from genloop.serving.hf.sequence import Sequence
from genloop.training.models import build_model
from genloop.training.tokenizer import train_tokenizer

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny GPT-2 (random weights), its tokenizer, a float64 reference copy and 8 prompts."""
    paragraphs = [p.strip() for t in pydoc_data.topics.topics.values() for p in t.split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) >= 64][:200]
    tokenizer = train_tokenizer(paragraphs, vocab_size=512)
    model = build_model("tiny", tokenizer, block_size=128, seed=0)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reference = model.double().eval()
    prompts = [paragraphs[i][: 15 + 23 * i] for i in range(8)]  # 4 … 60 tokens
    return folder, tokenizer, reference, prompts


def expected_ids(tiny, prompt: str, max_tokens: int) -> list[int]:
    _, tokenizer, reference, _ = tiny
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = reference.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture
def loop():
    """An event loop for Sequences built outside one: they deliver to it, it never needs to run."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_seq(loop, prompt_tokens: int = 1, streaming: bool = False, **params) -> Sequence:
    request = GenerationRequest(prompt="x", params=SamplingParams(**params))
    return Sequence(request, [5] * prompt_tokens, streaming=streaming, loop=loop)


def engine_for(tiny, **kwargs) -> HFEngine:
    return HFEngine(tiny[0], "v-test", dtype="float64", **kwargs)


async def stream_ids(engine: HFEngine, request: GenerationRequest, started: asyncio.Event | None = None):
    """Token ids, text and finish reason of a streamed request; ``started`` is set at the first token."""
    ids, text, finish = [], "", None
    async for chunk in engine.stream(request):
        ids += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason
        if started is not None:
            started.set()
    return ids, text, finish


def test_greedy_matches_generate_alone(tiny):
    """Also with the engine's fused GELU in place of the reference's six-op one."""
    prompts = tiny[3]
    assert any(isinstance(m, NewGELUActivation) for m in tiny[2].modules())

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            assert not any(isinstance(m, NewGELUActivation) for m in engine.model.modules())
            for prompt in (prompts[0], prompts[5]):
                request = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=24, **GREEDY))
                ids, _, _ = await stream_ids(engine, request)
                assert ids == expected_ids(tiny, prompt, 24)
                result = await engine.generate(request)
                assert result.text == tiny[1].decode(ids, skip_special_tokens=True)
        finally:
            await engine.close()

    asyncio.run(main())


def test_requests_joining_a_running_batch_match_generate(tiny):
    """8 prompts of 4–60 tokens join one by one, each once the previous has its first token; they
    leave at different times (different max_tokens). Every one must equal generate() alone."""
    prompts = tiny[3]
    order = [3, 0, 7, 1, 5, 2, 6, 4]  # long and short prompts alternate, so both sides get padded
    max_tokens = {i: 6 + 5 * n for n, i in enumerate(order)}
    max_tokens[order[0]] = 60  # the first one outlives all joins

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            tasks, batch_sizes = {}, []
            for i in order:
                started = asyncio.Event()
                params = SamplingParams(max_tokens=max_tokens[i], **GREEDY)
                request = GenerationRequest(prompt=prompts[i], params=params)
                tasks[i] = asyncio.create_task(stream_ids(engine, request, started))
                await started.wait()
                batch_sizes.append(engine.num_active)
            results = {i: await task for i, task in tasks.items()}
        finally:
            await engine.close()
        assert max(batch_sizes) >= 4, f"requests never shared a batch: {batch_sizes}"
        for i, (ids, _, finish) in results.items():
            assert ids == expected_ids(tiny, prompts[i], max_tokens[i]), f"prompt {i} diverged"
            assert finish == "length"

    asyncio.run(main())


def test_a_burst_joining_a_running_batch_in_length_groups_matches_generate(tiny):
    """One request runs; seven more arrive together, are prefilled in groups of at most 100 padded
    positions and join the running batch in one rebuild. Every one must equal generate() alone."""
    prompts = tiny[3]

    async def main():
        engine = engine_for(tiny, max_prefill_tokens=100)
        await engine.load()
        try:
            started = asyncio.Event()
            long = GenerationRequest(prompt=prompts[7], params=SamplingParams(max_tokens=40, **GREEDY))
            running = asyncio.create_task(stream_ids(engine, long, started))
            await started.wait()
            burst = [GenerationRequest(prompt=p, params=SamplingParams(max_tokens=12, **GREEDY)) for p in prompts[:7]]
            results = await asyncio.gather(*(engine.generate(r) for r in burst))
            return (await running)[0], results
        finally:
            await engine.close()

    running_ids, results = asyncio.run(main())
    assert running_ids == expected_ids(tiny, prompts[7], 40)
    for prompt, result in zip(prompts[:7], results, strict=True):
        assert result.text == tiny[1].decode(expected_ids(tiny, prompt, 12), skip_special_tokens=True)


def test_a_row_that_ended_at_the_context_limit_stays_harmless_until_compaction(tiny):
    """One of five requests fills the whole context and ends; four keep decoding 30 more steps with
    its dead row still in the batch (one dead in five is below the compaction threshold)."""
    prompts = tiny[3]
    limit = tiny[2].config.n_positions
    full = len(tiny[1](prompts[6])["input_ids"])
    cases = [(prompts[6], limit - full)] + [(prompts[i], limit - full + 30) for i in (0, 1, 2, 0)]  # ≤ 24 tokens

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            requests = [GenerationRequest(prompt=p, params=SamplingParams(max_tokens=n, **GREEDY)) for p, n in cases]
            return await asyncio.gather(*(engine.generate(r) for r in requests))
        finally:
            await engine.close()

    for (prompt, max_tokens), result in zip(cases, asyncio.run(main()), strict=True):
        assert result.text == tiny[1].decode(expected_ids(tiny, prompt, max_tokens), skip_special_tokens=True)


@pytest.mark.parametrize("max_prefill_tokens", [1024, 100])
def test_concurrent_burst_matches_generate(tiny, max_prefill_tokens):
    """All 8 at once (one shared prefill, or several by length), then leaving one by one."""
    prompts = tiny[3]

    async def main():
        engine = engine_for(tiny, max_prefill_tokens=max_prefill_tokens)
        await engine.load()
        try:
            requests = [
                GenerationRequest(prompt=p, params=SamplingParams(max_tokens=8 + 3 * i, **GREEDY))
                for i, p in enumerate(prompts)
            ]
            return await asyncio.gather(*(engine.generate(r) for r in requests))
        finally:
            await engine.close()

    results = asyncio.run(main())
    for i, result in enumerate(results):
        expected = expected_ids(tiny, prompts[i], 8 + 3 * i)
        assert result.text == tiny[1].decode(expected, skip_special_tokens=True)
        assert result.completion_tokens == 8 + 3 * i


def test_prefill_groups_are_length_sorted_and_within_the_token_budget(tiny, loop):
    _, tokenizer, _, prompts = tiny
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    seqs = [make_seq(loop, length) for length in lengths]
    groups = prefill_groups(seqs, 100)
    assert sorted(map(len, (s.prompt_ids for g in groups for s in g))) == sorted(lengths)
    flat = [len(s.prompt_ids) for g in groups for s in g]
    assert flat == sorted(flat), "shortest first"
    assert 1 < len(groups) < len(seqs)
    for group in groups:  # a prompt above the budget runs alone; the others fit in it
        assert len(group) * max(len(s.prompt_ids) for s in group) <= 100 or len(group) == 1
    assert [len(g) for g in prefill_groups(seqs, 10_000)] == [len(seqs)]


def test_max_tokens_finishes_with_length(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            request = GenerationRequest(prompt=tiny[3][2], params=SamplingParams(max_tokens=7, **GREEDY))
            result = await engine.generate(request)
            ids, _, finish = await stream_ids(engine, request)
        finally:
            await engine.close()
        assert result.finish_reason == "length" and result.completion_tokens == 7
        assert finish == "length" and len(ids) == 7
        assert result.prompt_tokens == len(tiny[1](tiny[3][2])["input_ids"])
        assert 0 < result.ttft_seconds <= result.total_seconds
        # The engine's own pace for the metrics: a wait before admission, then one gap per later token.
        assert result.queue_seconds is not None and 0 <= result.queue_seconds < result.ttft_seconds
        assert len(result.inter_token_seconds) == 6 and min(result.inter_token_seconds) > 0
        assert sum(result.inter_token_seconds) == pytest.approx(result.total_seconds - result.ttft_seconds)

    asyncio.run(main())


def test_stop_string_cuts_output_in_both_modes(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            prompt = tiny[3][1]
            free_params = SamplingParams(max_tokens=40, **GREEDY)
            free = await engine.generate(GenerationRequest(prompt=prompt, params=free_params))
            stop = free.text[6:9]
            cut = free.text[: free.text.index(stop)]
            stopped = SamplingParams(max_tokens=40, stop=[stop, "never-seen-stop"], **GREEDY)
            result = await engine.generate(GenerationRequest(prompt=prompt, params=stopped))
            _, streamed, finish = await stream_ids(engine, GenerationRequest(prompt=prompt, params=stopped))
        finally:
            await engine.close()
        assert result.finish_reason == "stop" and result.text == cut
        assert finish == "stop" and streamed == cut
        assert result.completion_tokens < 40

    asyncio.run(main())


def test_eos_finishes_with_stop_unless_ignored_or_before_min_tokens(tiny):
    """eos ends a completion; with ignore_eos it does not (the same tokens go on to max_tokens); with
    min_tokens it cannot be picked before then (greedy takes the next best), and a stop string seen
    before then does not end it either (vLLM's rules)."""
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            request = GenerationRequest(prompt=tiny[3][4], params=SamplingParams(max_tokens=30, **GREEDY))
            ids, text, _ = await stream_ids(engine, request)
            # The untrained model never says end-of-text; declare its 4th greedy token to be eos instead.
            engine._eos_ids = frozenset({ids[3]})
            result = await engine.generate(request)

            def variant(**params) -> GenerationRequest:
                return request.model_copy(update={"params": request.params.model_copy(update=params)})

            ignored = await stream_ids(engine, variant(ignore_eos=True))
            held = await engine.generate(variant(min_tokens=10))
            held_ids, _, _ = await stream_ids(engine, variant(min_tokens=10))
            stop = tiny[1].decode(ids[5:7])  # a stop string early in the text
            engine._eos_ids = frozenset()
            stopped = await engine.generate(variant(stop=[stop]))
            late = await engine.generate(variant(stop=[stop], min_tokens=20))
        finally:
            await engine.close()
        assert result.finish_reason == "stop"
        assert result.completion_tokens == ids.index(ids[3]) + 1
        assert ignored == (ids, text, "length")
        assert held.completion_tokens >= 10 and ids[3] not in held_ids[:10] and held_ids != ids
        assert stopped.text == text[:text.index(stop)] and stopped.completion_tokens < 20
        assert late.completion_tokens > 20 and late.text.startswith(text[:text.index(stop) + len(stop)])

    asyncio.run(main())


def test_split_characters_wait_for_their_last_byte_but_are_kept_at_the_end(tiny):
    """A multi-byte character split across tokens is held back mid-stream, and a completion that ends
    inside one (max_tokens hit) keeps the replacement character, as ``tokenizer.decode`` does; the
    first version dropped it."""
    euro = tiny[1]("€")["input_ids"]
    assert len(euro) == 3  # three byte tokens in this tiny vocabulary

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            whole = make_seq(asyncio.get_running_loop(), streaming=True, max_tokens=4)
            cut = make_seq(asyncio.get_running_loop(), streaming=True, max_tokens=2)
            for token in euro[:2]:
                engine._emit([whole, cut], [token, token], {})
            engine._emit([whole], [euro[2]], {})
            return [await whole.queue.get() for _ in range(3)], [await cut.queue.get() for _ in range(2)]
        finally:
            await engine.close()

    whole, cut = asyncio.run(main())
    assert [text for text, _, _ in whole] == ["", "", "€"]
    assert "".join(text for text, _, _ in cut) == tiny[1].decode(euro[:2]) and cut[-1][2] == "length"


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(tiny):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=40, seed=1234)

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            request = GenerationRequest(prompt=tiny[3][3], params=params)
            alone = await engine.generate(request)
            unseeded = SamplingParams(max_tokens=20, temperature=1.0)
            crowd = [GenerationRequest(prompt=p, params=unseeded) for p in tiny[3]]
            together = await asyncio.gather(engine.generate(request), *(engine.generate(r) for r in crowd))
            other_seed = await engine.generate(
                GenerationRequest(prompt=tiny[3][3], params=params.model_copy(update={"seed": 99}))
            )
        finally:
            await engine.close()
        assert together[0].text == alone.text
        assert other_seed.text != alone.text

    asyncio.run(main())


def test_frequency_penalty_discourages_repetition(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            base = SamplingParams(max_tokens=30, **GREEDY)
            request = GenerationRequest(prompt=tiny[3][0], params=base)
            plain, _, _ = await stream_ids(engine, request)
            penalised = request.model_copy(update={"params": base.model_copy(update={"frequency_penalty": 2.0})})
            varied, _, _ = await stream_ids(engine, penalised)
        finally:
            await engine.close()
        assert len(set(varied)) > len(set(plain))

    asyncio.run(main())


def test_repetition_penalty_is_transformers_and_min_p_1_leaves_only_the_most_likely_token(tiny):
    """The repetition penalty over prompt and output gives what ``generate(repetition_penalty=…)``
    gives (float64, greedy); min_p = 1 keeps only each step's most likely token, so a sampled
    completion equals the greedy one, which without min_p it does not."""
    prompt = tiny[3][2]
    _, tokenizer, reference, _ = tiny
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = reference.generate(**inputs, max_new_tokens=24, do_sample=False, repetition_penalty=1.5)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            penalised = SamplingParams(max_tokens=24, repetition_penalty=1.5, **GREEDY)
            repeating, _, _ = await stream_ids(engine, GenerationRequest(prompt=prompt, params=penalised))
            greedy, _, _ = await stream_ids(engine, GenerationRequest(prompt=prompt, params=SamplingParams(
                max_tokens=24, **GREEDY)))
            sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=3)
            narrowed = await asyncio.gather(*(stream_ids(engine, GenerationRequest(prompt=prompt, params=params))
                                              for params in (sampled.model_copy(update={"min_p": 1.0}), sampled)))
        finally:
            await engine.close()
        return repeating, greedy, [ids for ids, _, _ in narrowed]

    repeating, greedy, (narrowed, free) = asyncio.run(main())
    assert repeating == expected and repeating != greedy
    assert narrowed == greedy and free != greedy


def test_streaming_yields_the_same_text_as_generate(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            request = GenerationRequest(prompt=tiny[3][6], params=SamplingParams(max_tokens=25, **GREEDY))
            result = await engine.generate(request)
            chunks = [chunk async for chunk in engine.stream(request)]
        finally:
            await engine.close()
        assert "".join(c.text for c in chunks) == result.text
        assert len(chunks) == 25 and all(len(c.token_ids) == 1 for c in chunks)
        assert [c.finish_reason for c in chunks] == [None] * 24 + ["length"]
        assert chunks[-1].completion_tokens == 25
        assert {c.prompt_tokens for c in chunks} == {result.prompt_tokens}  # on every chunk: usage per chunk

    asyncio.run(main())


def test_logprobs_are_the_models_own_in_both_modes_and_max_tokens_0_scores_the_prompt(tiny):
    """Greedy, in float64: every logprob is the log-softmax of one plain forward pass over prompt +
    output, alternatives come most likely first, and the greedy token is the most likely; the stream
    reports what generate does (the prompt's on its first chunk), and max_tokens 0 (echo's scoring)
    generates nothing but the prompt's logprobs."""
    _, tokenizer, reference, prompts = tiny
    prompt = prompts[2]
    params = SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2, **GREEDY)

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            result = await engine.generate(GenerationRequest(prompt=prompt, params=params))
            chunks = [chunk async for chunk in engine.stream(GenerationRequest(prompt=prompt, params=params))]
            scored = [await engine.generate(GenerationRequest(prompt=prompt, params=SamplingParams(
                max_tokens=0, prompt_logprobs=0)))]
            scored += [chunk async for chunk in engine.stream(GenerationRequest(prompt=prompt, params=SamplingParams(
                max_tokens=0, prompt_logprobs=0)))]
        finally:
            await engine.close()
        return result, chunks, scored

    result, chunks, scored = asyncio.run(main())
    prompt_ids = tokenizer(prompt)["input_ids"]
    entries = [*result.prompt_logprobs, *result.logprobs]
    ids = [entry.token_id for entry in entries]
    assert ids[:len(prompt_ids)] == prompt_ids and len(result.logprobs) == result.completion_tokens == 6
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert entries[0].logprob is None and entries[0].top == []  # nothing predicts the first prompt token
    for position, entry in enumerate(entries[1:], start=1):
        top = expected[position - 1].topk(2 if position < len(prompt_ids) else 3)
        assert entry.logprob == pytest.approx(expected[position - 1, entry.token_id].item(), abs=1e-9)
        assert [t.token_id for t in entry.top] == top.indices.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=1e-9)
        assert entry.token == tokenizer.decode([entry.token_id])
    assert all(entry.top[0].token_id == entry.token_id for entry in result.logprobs)
    assert chunks[0].prompt_logprobs == result.prompt_logprobs and all(c.prompt_logprobs is None for c in chunks[1:])
    assert [entry for chunk in chunks for entry in chunk.logprobs] == result.logprobs
    for answer in scored:  # generate's result, then the stream's one chunk
        assert (answer.text, answer.completion_tokens, answer.finish_reason, answer.logprobs) == ("", 0, "length", None)
        assert [(p.token_id, p.logprob, p.top) for p in answer.prompt_logprobs] == [
            (p.token_id, p.logprob, []) for p in result.prompt_logprobs]


def test_response_format_holds_each_row_to_its_own_json_schema(tiny):
    """Constrained rows share the batch with a free one, each with its own matcher: what finishes with
    "stop" is JSON valid against its schema (an untrained model's nonsense, but valid), a budget that
    runs out first finishes with "length", the free row samples what it samples alone, and a schema
    that cannot be enforced is refused naming response_format."""
    schema = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}

    def request(seed: int, max_tokens: int = 40, **params) -> GenerationRequest:
        return GenerationRequest(prompt="Answer in JSON:", params=SamplingParams(max_tokens=max_tokens, seed=seed,
                                                                                  **params))

    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            together = await asyncio.gather(
                *(engine.generate(request(seed, json_schema=schema)) for seed in range(3)),
                *(engine.generate(request(seed, json_schema={"type": "object"})) for seed in range(4)),
                engine.generate(request(0, max_tokens=3, json_schema=schema)),
                engine.generate(request(0)))
            alone = await engine.generate(request(0))
            with pytest.raises(InvalidRequestError) as refused:
                await engine.generate(request(0, json_schema={"type": "frob"}))
        finally:
            await engine.close()
        return together, alone, refused.value

    together, alone, refused = asyncio.run(main())
    schemed, objects, (short, free) = together[:3], together[3:7], together[7:]
    for result in schemed:
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)
    finished = [json.loads(r.text) for r in objects if r.finish_reason == "stop"]
    assert finished and all(isinstance(value, dict) for value in finished)
    assert short.finish_reason == "length" and short.completion_tokens == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.text)
    assert free.text == alone.text
    assert refused.param == "response_format" and "frob" in str(refused)


def test_streams_beyond_the_event_budget_get_tokens_in_groups(tiny):
    """Four streams with one event per step: each chunk after the first carries about four tokens,
    and nothing is lost or reordered — the ids and text equal generate's."""
    async def main():
        engine = engine_for(tiny, stream_events_per_step=1)
        await engine.load()
        try:
            requests = [GenerationRequest(prompt=p, params=SamplingParams(max_tokens=20, **GREEDY))
                        for p in tiny[3][:4]]
            results = await asyncio.gather(*(engine.generate(r) for r in requests))
            streams = await asyncio.gather(*(collect(engine.stream(r)) for r in requests))
        finally:
            await engine.close()
        for request, result, chunks in zip(requests, results, streams, strict=True):
            assert [t for c in chunks for t in c.token_ids] == expected_ids(tiny, request.prompt, 20)
            assert "".join(c.text for c in chunks) == result.text
            assert len(chunks[0].token_ids) == 1  # the first token is never held back
            assert max(len(c.token_ids) for c in chunks) == 4 and len(chunks) < 20 / 2
            assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 20
            # Grouped chunks still report every gap between tokens, as the engine made them.
            assert len(chunks[-1].inter_token_seconds) == 19 and chunks[-1].queue_seconds is not None

    async def collect(stream):
        return [chunk async for chunk in stream]

    asyncio.run(main())


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_closed_or_cancelled_stream_frees_its_slot(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            long = SamplingParams(max_tokens=200, **GREEDY)
            stream = engine.stream(GenerationRequest(prompt=tiny[3][0], params=long))
            await anext(stream)
            await anext(stream)
            assert engine.num_active == 1
            await stream.aclose()  # the client went away
            await wait_until(lambda: engine.num_active == 0)

            task = asyncio.create_task(engine.generate(GenerationRequest(prompt=tiny[3][1], params=long)))
            await wait_until(lambda: engine.num_active == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: engine.num_active == 0)

            after = await engine.generate(GenerationRequest(prompt=tiny[3][2], params=SamplingParams(max_tokens=3)))
            assert 1 <= after.completion_tokens <= 3  # the engine keeps serving (a sampled eos may end it early)
        finally:
            await engine.close()

    asyncio.run(main())


def test_health_load_and_close(tiny):
    async def main():
        engine = engine_for(tiny)
        assert not await engine.health()
        with pytest.raises(EngineError, match="not loaded"):
            await engine.generate(GenerationRequest(prompt="x"))
        await engine.load()
        assert await engine.health()
        assert engine.context_length == 256 and engine.model_version == "v-test"
        running = asyncio.create_task(
            engine.generate(GenerationRequest(prompt=tiny[3][0], params=SamplingParams(max_tokens=200)))
        )
        await wait_until(lambda: engine.num_active == 1)
        await engine.close()
        assert not await engine.health()
        assert not engine._thread.is_alive()
        with pytest.raises(EngineError, match="closed"):
            await running  # requests still in flight fail instead of hanging
        with pytest.raises(EngineError, match="closed"):
            await engine.generate(GenerationRequest(prompt="x"))

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        forward = engine.model.forward

        def broken(*args, **kwargs):
            engine.model.forward = forward  # fail once, as an out-of-memory step would
            raise RuntimeError("simulated out of memory")

        engine.model.forward = broken
        try:
            with pytest.raises(EngineError, match="simulated out of memory"):
                await engine.generate(GenerationRequest(prompt=tiny[3][0], params=SamplingParams(max_tokens=4)))
            assert engine.num_active == 0 and await engine.health()
            result = await engine.generate(GenerationRequest(prompt=tiny[3][0], params=SamplingParams(max_tokens=4)))
            assert 1 <= result.completion_tokens <= 4  # served again (sampled: an eos may end it early)
        finally:
            await engine.close()

    asyncio.run(main())


def test_invalid_requests_are_rejected_naming_the_parameter(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            with pytest.raises(InvalidRequestError) as too_long:
                await engine.generate(GenerationRequest(prompt_token_ids=[5] * 256))
            assert too_long.value.param == "prompt"
            with pytest.raises(InvalidRequestError) as n:
                await engine.generate(GenerationRequest(prompt="x", params=SamplingParams(n=2)))
            assert n.value.param == "n"
            with pytest.raises(InvalidRequestError) as vocab:
                await engine.generate(GenerationRequest(prompt_token_ids=[100_000]))
            assert vocab.value.param == "prompt_token_ids"
            # prompt + max_tokens past the context is refused, naming max_tokens; up to it is served.
            with pytest.raises(InvalidRequestError) as too_long:
                await engine.generate(
                    GenerationRequest(prompt_token_ids=[5] * 250, params=SamplingParams(max_tokens=50, **GREEDY))
                )
            assert too_long.value.param == "max_tokens"
            result = await engine.generate(
                GenerationRequest(prompt_token_ids=[5] * 250, params=SamplingParams(max_tokens=6, **GREEDY))
            )
            assert result.finish_reason == "length" and result.completion_tokens == 6
        finally:
            await engine.close()

    asyncio.run(main())
    with pytest.raises(ValidationError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValidationError, match="min_tokens"):
        SamplingParams(max_tokens=10, min_tokens=11)
    for bad in ({"repetition_penalty": 0}, {"repetition_penalty": float("inf")}, {"min_p": 1.5}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValidationError, match="prompt"):
        GenerationRequest()
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_chat_is_rendered_with_the_models_template(tiny):
    async def main():
        engine = engine_for(tiny)
        await engine.load()
        try:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
            rendered = "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
            assert engine.render_chat(messages) == rendered
            assert engine.render_chat(messages, add_generation_prompt=False) == rendered.removesuffix("<|assistant|>\n")
            with pytest.raises(InvalidRequestError) as bad:
                engine.render_chat([{"content": "no role"}])
            assert bad.value.param == "messages"
            # /tokenize and /detokenize: the ids generation starts from, and back, for short and long texts.
            for text in (rendered, rendered * 300):
                ids = await engine.tokenize(text)
                assert ids == tiny[1](text)["input_ids"] and await engine.detokenize(ids) == text
            assert engine.vocab_size == len(tiny[1])
            with pytest.raises(InvalidRequestError, match=r"token id 512 is outside the vocabulary \[0, 512\)") as out:
                engine.check_token_ids([3, 512, -1], "tokens")
            assert out.value.param == "tokens"
        finally:
            await engine.close()

    asyncio.run(main())


def test_full_queue_is_refused(tiny):
    """One request decodes in the only slot, one waits in the only queue place: a third gets EngineOverloaded."""
    async def main():
        engine = engine_for(tiny, max_batch_size=1, max_queue_size=1)
        await engine.load()
        try:
            longest = SamplingParams(max_tokens=240, **GREEDY)  # the slot stays taken for 240 steps
            running = asyncio.create_task(engine.generate(GenerationRequest(prompt=tiny[3][0], params=longest)))
            await wait_until(lambda: engine.num_active == 1)
            queued = asyncio.create_task(engine.generate(GenerationRequest(prompt=tiny[3][0], params=longest)))
            await wait_until(lambda: engine.num_waiting == 1)
            with pytest.raises(EngineOverloaded, match="1 requests already waiting"):
                await engine.generate(GenerationRequest(prompt="x"))
            for task in (running, queued):
                task.cancel()
            await asyncio.gather(running, queued, return_exceptions=True)
        finally:
            await engine.close()

    asyncio.run(main())


def test_int8_engine_generates(tiny):
    async def main():
        engine = HFEngine(tiny[0], "v-int8", int8=True)
        await engine.load()
        try:
            params = SamplingParams(max_tokens=5, temperature=0)
            result = await engine.generate(GenerationRequest(prompt=tiny[3][1], params=params))
        finally:
            await engine.close()
        # The quantised model may end early with eos; what must hold is a well-formed completion.
        assert 1 <= result.completion_tokens <= 5
        assert result.finish_reason == "stop" or result.completion_tokens == 5

    asyncio.run(main())


# -- parts without a model --------------------------------------------------------------------


def test_admission_fills_the_free_slots_in_arrival_order_skipping_cancelled_requests(loop):
    scheduler = Scheduler(HFEngineOptions(max_batch_size=3, max_wait_ms=0))
    seqs = [make_seq(loop) for _ in range(6)]
    for seq in seqs:
        scheduler.add(seq)
    seqs[1].cancelled = True  # its consumer left while it waited: it takes no slot
    assert scheduler.take_newcomers(running=0) == [seqs[0], seqs[2], seqs[3]]
    assert seqs[0].scheduled_at is not None and seqs[4].scheduled_at is None  # the end of its queue time
    assert scheduler.num_waiting == 2
    assert scheduler.take_newcomers(running=3) == []  # a full batch admits nobody
    assert scheduler.take_newcomers(running=2) == [seqs[4]]
    assert scheduler.drain() == [seqs[5]] and scheduler.num_waiting == 0


def test_an_idle_scheduler_waits_max_wait_for_companions_a_busy_one_does_not(loop):
    patient = Scheduler(HFEngineOptions(max_batch_size=2, max_wait_ms=60_000))
    first, second = make_seq(loop), make_seq(loop)
    patient.add(first)
    threading.Timer(0.05, patient.add, [second]).start()
    started = time.perf_counter()
    assert patient.take_newcomers(running=0) == [first, second]  # both share one prefill
    assert time.perf_counter() - started < 30  # a full batch ends the wait at once

    patient.add(third := make_seq(loop))
    started = time.perf_counter()
    assert patient.take_newcomers(running=1) == [third]  # rows are decoding: nobody waits for more
    assert time.perf_counter() - started < 30

    brief = Scheduler(HFEngineOptions(max_batch_size=2, max_wait_ms=50))
    brief.add(first)
    started = time.perf_counter()
    assert brief.take_newcomers(running=0) == [first]
    assert time.perf_counter() - started >= 0.05


def test_an_idle_scheduler_blocks_until_stopped_then_refuses_requests(loop):
    scheduler = Scheduler(HFEngineOptions())
    threading.Timer(0.05, scheduler.stop).start()
    assert scheduler.take_newcomers(running=0) is None
    assert scheduler.stopping
    with pytest.raises(EngineError, match="engine is closed"):
        scheduler.add(make_seq(loop))


def test_a_full_queue_refuses_with_overloaded_until_a_place_frees(loop):
    scheduler = Scheduler(HFEngineOptions(max_batch_size=1, max_queue_size=2, max_wait_ms=0))
    scheduler.add(make_seq(loop))
    scheduler.add(make_seq(loop))
    with pytest.raises(EngineOverloaded, match="2 requests already waiting"):
        scheduler.add(make_seq(loop))
    assert scheduler.num_waiting == 2
    assert len(scheduler.take_newcomers(running=0)) == 1
    scheduler.add(make_seq(loop))
    assert scheduler.num_waiting == 2


@pytest.mark.parametrize(
    ("rows", "dead", "slots_wanted", "compacted"),
    [
        (8, 0, True, False),  # nothing to drop
        (8, 1, False, False),  # one dead in eight: kept, computed and ignored
        (5, 1, False, False),
        (8, 1, True, True),  # a waiting request wants the slot
        (8, 2, False, True),  # a quarter dead
        (4, 1, False, True),
        (3, 3, False, True),  # all dead
    ],
)
def test_dead_rows_are_compacted_away_at_a_quarter_all_or_when_a_slot_is_wanted(
    loop, rows, dead, slots_wanted, compacted
):
    seqs = [make_seq(loop) for _ in range(rows)]
    for i, seq in enumerate(seqs[:dead]):  # finished and cancelled rows count alike
        if i % 2:
            seq.cancelled = True
        else:
            seq.finish_reason = "stop"
    keep = rows_to_keep(seqs, slots_wanted)
    assert keep == (list(range(dead, rows)) if compacted else None)


def test_joined_rows_are_left_padded_and_compaction_trims_padding_columns(loop):
    """Two parts of widths 2 and 4 join as one left-padded batch; dropping the wide row leaves the
    narrow one as it was, and the joined cache then grows in place by a decoding step's column."""
    def part(rows: int, width: int, first: float) -> Rows:
        keys = torch.arange(first, first + rows * width, dtype=torch.float64).view(rows, 1, width, 1)
        cache = DynamicCache()
        cache.update(keys, -keys, 0)
        seqs = [make_seq(loop, width) for _ in range(rows)]
        return Rows(seqs, cache, torch.ones((rows, width), dtype=torch.long), torch.full((rows,), width),
                    torch.full((rows,), 7))

    narrow, wide = part(1, 2, 1.0), part(1, 4, 10.0)
    batch = join([narrow, wide])
    assert batch.seqs == narrow.seqs + wide.seqs
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch.cache.layers[0].keys.flatten().tolist() == [0, 0, 1, 2, 10, 11, 12, 13]
    assert batch.cache.layers[0].values.flatten().tolist() == [0, 0, -1, -2, -10, -11, -12, -13]
    assert batch.positions.tolist() == [2, 4]

    alone = compact(batch, [0])
    assert alone.seqs == narrow.seqs and alone.mask.tolist() == [[1, 1]]
    assert alone.cache.layers[0].keys.flatten().tolist() == [1, 2] and alone.positions.tolist() == [2]

    step = torch.tensor([[20.0], [21.0]], dtype=torch.float64).view(2, 1, 1, 1)
    keys, _ = batch.cache.layers[0].update(step, -step)
    assert keys[:, 0, :, 0].tolist() == [[0, 0, 1, 2, 20], [10, 11, 12, 13, 21]]
    assert batch.cache.get_seq_length() == 5


def detokenize(tokenizer, seq: Sequence, text: str, final_at_end: bool = False) -> list[str]:
    """Feed ``text`` one character (one token of the tiny vocabulary) at a time; the deltas handed out."""
    deltas = []
    for i, char in enumerate(text):
        (token,) = tokenizer(char)["input_ids"]
        seq.output_ids.append(token)
        deltas.append(advance_text(tokenizer, seq, final=final_at_end and i == len(text) - 1))
    return deltas


def test_a_tail_that_may_become_a_stop_string_is_held_back_until_it_cannot(tiny, loop):
    tokenizer = tiny[1]
    seq = make_seq(loop, stop=["END", "xyz"])
    assert detokenize(tokenizer, seq, "ok ENxy!") == ["o", "k", " ", "", "", "EN", "", "xy!"]
    assert seq.finish_reason is None and seq.text == "ok ENxy!"


def test_a_completed_stop_string_cuts_the_text_and_finishes_the_sequence(tiny, loop):
    tokenizer = tiny[1]
    seq = make_seq(loop, stop=["END"])
    assert detokenize(tokenizer, seq, "a END") == ["a", " ", "", "", ""]
    assert seq.finish_reason == "stop" and seq.text == "a "


def test_the_last_token_releases_a_held_back_tail(tiny, loop):
    seq = make_seq(loop, stop=["END"])
    assert detokenize(tiny[1], seq, "a EN", final_at_end=True) == ["a", " ", "", "EN"]
    assert seq.finish_reason is None  # the engine sets "length" or "stop" (eos) itself


def test_options_are_validated_and_keyword_fields_override_them():
    engine = HFEngine("unused", "v", HFEngineOptions(max_batch_size=3, max_wait_ms=0), max_wait_ms=7)
    assert engine.options == HFEngineOptions(max_batch_size=3, max_wait_ms=7)
    assert HFEngine("unused", "v").options == HFEngineOptions()
    with pytest.raises(ValueError, match="int8 dynamic quantisation runs on CPU only"):
        HFEngine("unused", "v", device="cuda", int8=True)
    with pytest.raises(ValueError, match="dtype 'float65' is not a torch dtype"):
        HFEngineOptions(dtype="float65")
    with pytest.raises(ValueError, match="max_batch_size"):
        HFEngine("unused", "v", max_batch_size=0)
    with pytest.raises(ValueError, match="max_batchsize"):  # a typo is refused, not ignored
        HFEngine("unused", "v", max_batchsize=4)
