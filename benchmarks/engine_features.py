"""What logprobs and response_format cost HFEngine: the same requests with and without them.

The model, tokenizer and prompts of ``engine_throughput.py`` (a ~12M-parameter GPT-2 with random
weights), greedy decoding with ``ignore_eos`` so that every row generates exactly ``--new-tokens``:

- ``plain``: no logprobs, no constraint — the baseline;
- ``logprobs_5``: each generated token's logprob and its 5 most likely alternatives (OpenAI's
  completions maximum);
- ``json_schema``: JSON enforced by llguidance, with a schema whose one string must be longer than
  the budget, so the constraint masks every step and no row ends early;
- ``both``: the two together.

Each at 1 and at 32 concurrent requests. ``ratio_vs_plain`` is tokens/s against ``plain`` at the same
concurrency; ``overhead_us_per_token`` is the extra wall time per generated token of one row
(per-step cost divided by the rows in the batch). Prints JSON.

    python benchmarks/engine_features.py [--new-tokens 64] [--repeats 3] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from engine_throughput import BATCH, best, build
from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path

from genloop.serving.engine import GenerationRequest, SamplingParams
from genloop.serving.hf.engine import HFEngine

# One string field longer than any budget here: the grammar constrains every step and never completes.
LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100_000}},
               "required": ["text"], "additionalProperties": False}
CASES: dict[str, dict] = {
    "plain": {},
    "logprobs_5": {"logprobs": 5},
    "json_schema": {"json_schema": LONG_STRING},
    "both": {"logprobs": 5, "json_schema": LONG_STRING},
}


async def run(engine: HFEngine, prompts: list[list[int]], new_tokens: int, extra: dict) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, **extra)
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(GenerationRequest(prompt_token_ids=p, params=params))
                                     for p in prompts))
    seconds = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


async def main_async(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    report: dict = {"load_average_1m": os.getloadavg()[0], "new_tokens": args.new_tokens, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        _, _, prompts = build(folder)
        engine = HFEngine(folder, "bench", max_batch_size=BATCH)
        await engine.load()
        for extra in CASES.values():  # warm-up, the grammar compiler included
            await run(engine, prompts[:2], 4, extra)
        for concurrency in (1, BATCH):
            batch = prompts[BATCH // 2: BATCH // 2 + 1] if concurrency == 1 else prompts
            section = {name: best([await run(engine, batch, args.new_tokens, extra) for _ in range(args.repeats)])
                       for name, extra in CASES.items()}
            plain = section["plain"]
            for name in CASES:
                if name == "plain":
                    continue
                case = section[name]
                case["ratio_vs_plain"] = case["tokens_per_s"] / plain["tokens_per_s"]
                case["overhead_us_per_token"] = 1e6 * (1 / case["tokens_per_s"] - 1 / plain["tokens_per_s"])
            report[f"concurrency_{concurrency}"] = section
        await engine.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_features.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(main_async(args))
    emit(report, args.out)


if __name__ == "__main__":
    main()
