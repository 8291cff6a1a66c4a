"""Engine throughput: HFEngine's continuous batching against one ``model.generate`` on the whole batch.

The same ~12M-parameter GPT-2 (random weights: throughput does not depend on what the weights
say), the same 32 prompts of 16–64 tokens, greedy decoding, the same number of new tokens:

- ``direct``: one ``model.generate`` call on the 32 prompts, left padded — the static-batching
  baseline, which knows the whole batch up front and pays no scheduling, queueing or streaming cost;
- ``engine_1``: HFEngine serving one request at a time (its TTFT is the latency floor);
- ``engine_32``: HFEngine with 32 concurrent ``generate`` requests;
- ``engine_32_stream``: the same through ``stream()``, one chunk per token to each consumer.

``direct.ttft_s`` is ``generate`` with one new token on the batch: when a static batch has its
first tokens, i.e. the prefill of all 32 prompts, which also bounds the engine's p95 TTFT from below
wherever prefill is compute-bound (CPU). tokens/s counts generated tokens (up to and including eos,
if a row emits one) over wall time.
Goal: engine_32 ≥ 0.85 × direct, and p95 TTFT of engine_32 ≤ 3 × engine_1's TTFT. Prints JSON.

    python benchmarks/engine_throughput.py [--new-tokens 128] [--repeats 3] [--threads 2] [--device cpu]
                                          [--int8] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pydoc_data.topics
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path
from transformers import AutoModelForCausalLM, GPT2Config

from genloop.serving.engine import GenerationRequest, SamplingParams
from genloop.serving.hf.engine import HFEngine
from genloop.training.models import parameter_count
from genloop.training.tokenizer import train_tokenizer

BATCH = 32


def build(folder: Path, seed: int = 0) -> tuple[torch.nn.Module, object, list[list[int]]]:
    """Save a random ~12M-param GPT-2 and its tokenizer to ``folder``; return them and 32 prompts."""
    texts = [p.strip() for topic in pydoc_data.topics.topics.values() for p in topic.split("\n\n")]
    tokenizer = train_tokenizer(texts, vocab_size=8192, min_frequency=1)  # the corpus is small: keep rare merges
    texts = [t for t in texts if len(t) >= 400]
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=256, n_layer=12, n_head=8, n_positions=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = []
    for i, text in enumerate(texts[:BATCH]):
        length = 16 + (i * 48) // (BATCH - 1)  # 16 … 64 tokens
        prompts.append(tokenizer(text)["input_ids"][:length])
    return model, tokenizer, prompts


def generated_tokens(row: list[int], eos: int) -> int:
    return row.index(eos) + 1 if eos in row else len(row)


def run_direct(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> dict:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - started
    tokens = sum(generated_tokens(row, tokenizer.eos_token_id) for row in out[:, width:].tolist())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def measure_direct(model, tokenizer, prompts: list[list[int]], new_tokens: int, repeats: int = 3) -> dict:
    """The limit: the median ``generate`` run on all prompts; ``ttft_s``, the median time to their first
    tokens (the prefill of all of them, a floor for any p95 TTFT wherever prefill is compute-bound)."""
    direct = best([run_direct(model, tokenizer, prompts, new_tokens) for _ in range(repeats)])
    direct["ttft_s"] = statistics.median(run_direct(model, tokenizer, prompts, 1)["seconds"] for _ in range(repeats))
    return direct


async def run_engine(engine: HFEngine, prompts: list[list[int]], new_tokens: int, stream: bool) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0)

    async def one(prompt: list[int]) -> tuple[int, float]:
        request = GenerationRequest(prompt_token_ids=prompt, params=params)
        if not stream:
            result = await engine.generate(request)
            return result.completion_tokens, result.ttft_seconds
        started, ttft, tokens = time.perf_counter(), None, 0
        async for chunk in engine.stream(request):
            ttft = ttft if ttft is not None else time.perf_counter() - started
            tokens += len(chunk.token_ids)
        return tokens, ttft

    started = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    seconds = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    ttfts = sorted(r[1] for r in results)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))],
    }


def best(runs: list[dict]) -> dict:
    """The median run by throughput, so one noisy repeat on a shared machine does not decide."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


async def main_async(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model, tokenizer, prompts = build(folder)
        model = model.to(args.device)
        run_direct(model, tokenizer, prompts[:4], 8)  # warm-up
        direct = measure_direct(model, tokenizer, prompts, args.new_tokens, args.repeats)

        engine = HFEngine(folder, "bench", device=args.device, max_batch_size=BATCH, int8=args.int8)
        await engine.load()
        await run_engine(engine, prompts[:4], 8, stream=False)  # warm-up
        single = []
        for _ in range(args.repeats):
            single.append(await run_engine(engine, prompts[BATCH // 2: BATCH // 2 + 1], args.new_tokens, False))
        engine_1 = best(single)
        engine_1["ttft_s"] = statistics.median(r["ttft_p50_s"] for r in single)
        engine_32 = best([await run_engine(engine, prompts, args.new_tokens, False) for _ in range(args.repeats)])
        engine_32s = best([await run_engine(engine, prompts, args.new_tokens, True) for _ in range(args.repeats)])
        await engine.close()

    return {
        "load_average_1m": os.getloadavg()[0],
        "model": {"parameters": parameter_count(model), "n_embd": 256, "n_layer": 12, "vocab": len(tokenizer)},
        "batch": BATCH,
        "new_tokens": args.new_tokens,
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "device": args.device,
        "threads": args.threads,
        "int8": args.int8,
        "direct": direct,
        "engine_1": engine_1,
        "engine_32": engine_32,
        "engine_32_stream": engine_32s,
        "ratio_32_vs_direct": engine_32["tokens_per_s"] / direct["tokens_per_s"],
        "ratio_32_stream_vs_direct": engine_32s["tokens_per_s"] / direct["tokens_per_s"],
        "ttft_p95_32_vs_1": engine_32["ttft_p95_s"] / engine_1["ttft_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--int8", action="store_true", help="serve the engine with dynamic int8 weights")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(main_async(args))
    emit(report, args.out)


if __name__ == "__main__":
    main()
