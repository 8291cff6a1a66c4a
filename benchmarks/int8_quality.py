"""int8 dynamic quantisation on CPU: what it buys (speed, memory) and what it costs (quality).

The same trained model is measured twice, float32 and with ``serving.int8`` (HFEngine's dynamic
int8 of every linear layer), in one run:

- quality on held-out Python documentation the model never trained on, with the gate's own
  ``evaluate_model``: bits per byte, perplexity, BLEU / chrF / ROUGE-L of greedy continuations
  against the real text, and how often the two greedy continuations agree token for token;
- speed: HFEngine throughput with 32 concurrent requests and single-request latency;
- size of the linear weights in memory.

The model is the ~12M-parameter GPT-2 of the serving benchmarks, trained here for ``--steps``
AdamW steps on the first part of the pydoc topics (random weights would make "quality"
meaningless), or ``--model`` for an existing Hugging Face folder (e.g. a champion). Prints JSON
and writes it under benchmarks/results/.

    python benchmarks/int8_quality.py [--steps 300] [--model DIR] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import pydoc_data.topics
import tempfile
import time
from pathlib import Path

import torch
from engine_throughput import BATCH, build, run_engine  # sibling benchmark: same model
from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path

from genloop.serving.hf.engine import HFEngine
from genloop.serving.hf.model_prep import quantize_int8
from genloop.training.evaluation import evaluate_model, make_prompts
from genloop.training.models import parameter_count


def corpus() -> tuple[list[str], list[str]]:
    """Pydoc topic paragraphs split by topic: the first 80 % to train on, the rest held out."""
    topics = sorted(pydoc_data.topics.topics.items())
    cut = int(len(topics) * 0.8)

    def paragraphs(items) -> list[str]:
        return [p.strip() for _, text in items for p in text.split("\n\n") if len(p.strip()) > 80]

    return paragraphs(topics[:cut]), paragraphs(topics[cut:])


def train(model: torch.nn.Module, tokenizer, texts: list[str], steps: int, block: int = 128, batch: int = 16) -> float:
    ids = tokenizer(tokenizer.eos_token.join(texts))["input_ids"]
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss)


def linear_bytes(model: torch.nn.Module) -> int:
    """Serialized size of the state dict (int8 packed weights count as what they are)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


async def speed(folder: Path, prompts: list[list[int]], new_tokens: int, int8: bool) -> dict:
    engine = HFEngine(folder, "bench", max_batch_size=BATCH, int8=int8)
    await engine.load()
    try:
        await run_engine(engine, prompts[:4], 8, stream=False)  # warm-up
        single = await run_engine(engine, prompts[:1], new_tokens, stream=False)
        batch = await run_engine(engine, prompts, new_tokens, stream=False)
    finally:
        await engine.close()
    return {"tokens_per_s_32": batch["tokens_per_s"], "single_request_s": single["seconds"],
            "ttft_single_s": single["ttft_p50_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", type=Path, help="an existing model folder instead of training one")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=200, help="held-out paragraphs scored")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_quality.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_texts, held_out = corpus()
    held_out = held_out[: args.held_out]

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or Path(tmp) / "model"
        training: dict = {}
        if args.model is None:
            model, tokenizer, prompt_ids = build(folder)
            started = time.perf_counter()
            training = {"steps": args.steps, "final_loss": train(model, tokenizer, train_texts, args.steps),
                        "seconds": time.perf_counter() - started}
            model.save_pretrained(folder)
        else:
            from genloop.training.evaluation import load_for_evaluation

            model, tokenizer = load_for_evaluation(folder)
            prompt_ids = [tokenizer(t)["input_ids"][:48] for t in held_out[:BATCH]]
        prompts = make_prompts(held_out, n=64, prompt_words=24, reference_words=16, seed=0)
        block = min(getattr(model.config, "n_positions", 512), 256)
        options = dict(block_size=block, stride=block // 2, max_new_tokens=24, reference_words=16)

        fp32_metrics, fp32_text = evaluate_model(model, tokenizer, held_out, prompts, **options)
        fp32_bytes = linear_bytes(model)
        quantized = quantize_int8(model)
        int8_metrics, int8_text = evaluate_model(quantized, tokenizer, held_out, prompts, **options)
        int8_bytes = linear_bytes(quantized)

        fp32_speed = asyncio.run(speed(folder, prompt_ids, args.new_tokens, int8=False))
        int8_speed = asyncio.run(speed(folder, prompt_ids, args.new_tokens, int8=True))

    quality = {"fp32": fp32_metrics.model_dump(), "int8": int8_metrics.model_dump()}
    report = {
        "load_average_1m": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "model": {"parameters": parameter_count(model), "source": str(args.model) if args.model else "trained here",
                  **training},
        "held_out": {"texts": len(held_out), "prompts": len(prompts)},
        "quality": quality,
        "speed": {"fp32": fp32_speed, "int8": int8_speed},
        "state_dict_bytes": {"fp32": fp32_bytes, "int8": int8_bytes},
        "ratios_int8_vs_fp32": {
            "tokens_per_s_32": int8_speed["tokens_per_s_32"] / fp32_speed["tokens_per_s_32"],
            "single_request_latency": int8_speed["single_request_s"] / fp32_speed["single_request_s"],
            "state_dict_bytes": int8_bytes / fp32_bytes,
            "bits_per_byte": int8_metrics.bits_per_byte / fp32_metrics.bits_per_byte,
            "perplexity": int8_metrics.perplexity / fp32_metrics.perplexity,
        },
        "greedy_continuations_identical": agreement(fp32_text, int8_text),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
