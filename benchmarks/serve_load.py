"""Serving under load, over HTTP: naive FastAPI vs `transformers serve` vs genloop vs one generate.

One run, the same random ~12M-parameter GPT-2 (``engine_throughput.build``), the same 32 prompts
of 16–64 tokens, greedy decoding, ``--new-tokens`` per request, streamed completions:

- ``naive``: a plain FastAPI app that runs one ``model.generate`` per request (threads, streamer);
- ``hf_serve``: ``transformers serve --continuous-batching`` on the same model folder;
- ``genloop``: genloop's Ray Serve app (HFEngine, continuous batching), one replica;
- ``direct``: the limit — one in-process ``model.generate`` on all 32 prompts at once.

This machine's speed drifts by tens of percent within minutes (shared cores), so ``direct`` is
measured around each system, before its server starts and after it stops (median of 3 runs each),
and each system's ratio is taken against the mean of its own two.

Each server runs alone, on the same cores, and a closed-loop asyncio client keeps ``c`` requests in
flight (c = 1, 8, 32; 2·c requests, at least 4) after a warm-up. Per level: throughput (generated
tokens/s, from each response's usage), p50/p95 time to first token and end-to-end latency. Goals
at c = 32: genloop ≥ 0.85 × direct, and genloop's p95 TTFT ≤ 3 × its TTFT at c = 1. Prints JSON
and writes it with a PNG plot under benchmarks/results/.

    python benchmarks/serve_load.py [--new-tokens 64] [--concurrency 1 8 32] [--systems naive hf_serve genloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from engine_throughput import build, measure_direct, run_direct  # sibling benchmark: same model and prompts
from report import RESULTS, emit, free_port  # benchmarks/ is the script's folder, on sys.path

from genloop.training.models import parameter_count

SYSTEMS = ("naive", "hf_serve", "genloop")


# --- (a) the naive server ------------------------------------------------------------------------
def naive_server(model_dir: str, port: int, device: str) -> None:
    """One ``model.generate`` per request on FastAPI's thread pool, streamed through TextIteratorStreamer."""
    from threading import Thread

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    app = FastAPI()

    @app.post("/v1/completions")
    def complete(body: dict) -> StreamingResponse:
        ids = tokenizer(body["prompt"], return_tensors="pt").to(device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        out: dict = {}

        def run() -> None:
            with torch.inference_mode():
                out["ids"] = model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False,
                                            streamer=streamer, pad_token_id=tokenizer.pad_token_id)

        thread = Thread(target=run)
        thread.start()

        def events():
            for text in streamer:
                yield f"data: {json.dumps({'choices': [{'text': text, 'index': 0}]})}\n\n"
            thread.join()
            generated = out["ids"].shape[1] - ids["input_ids"].shape[1]
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': generated}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- the servers, started one at a time -----------------------------------------------------------
def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


class Server:
    """A system under test: started, measured through ``url``, stopped."""

    def __init__(self, system: str, model_dir: Path, threads: int, device: str):
        self.system, self.model_dir, self.threads, self.device = system, model_dir, threads, device
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.model_name = {"hf_serve": str(model_dir)}.get(system, "genloop")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        if self.system == "naive":
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--naive-server", str(self.model_dir), self.device, str(self.port)], env=env)
        elif self.system == "hf_serve":
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching", "--device",
                 self.device, "--host", "127.0.0.1", "--port", str(self.port), str(self.model_dir)], env=env)
        else:
            self._start_genloop()
        wait_ready(f"{self.url}/health", self.process)
        return self

    def _start_genloop(self) -> None:
        import ray
        from ray import serve

        from genloop.services.cluster import use_serve_env
        from genloop.serving.app import serve_app
        from genloop.serving.hf.engine import HFEngine

        use_serve_env()  # as `genloop serve` starts its Ray
        ray.init(address="local", num_cpus=os.cpu_count(), logging_level="ERROR", include_dashboard=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(self.threads)}})
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        from genloop.serving.hf.options import HFEngineOptions
        from genloop.serving.settings import DeploymentOptions, ServerSettings

        # One load generator is one client: no per-client limit, or concurrency past it would measure 429s.
        settings = ServerSettings(model_uri=str(self.model_dir), model_version="1", engine_class=HFEngine,
                                  engine_options=HFEngineOptions(max_batch_size=32, device=self.device),
                                  max_requests_per_client=None)
        # Ray hides GPUs from an actor that reserves none.
        serve_app(settings, deployment=DeploymentOptions(replica_gpus=0.0 if self.device == "cpu" else 1.0))

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        else:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


# --- the load -------------------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, server: Server, prompt: str, new_tokens: int) -> dict:
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in event.get("choices") or []):
                ttft = ttft if ttft is not None else time.perf_counter() - started
                chunks += 1
    return {"ttft": ttft if ttft is not None else time.perf_counter() - started,
            "e2e": time.perf_counter() - started, "tokens": usage if usage is not None else chunks}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def load(server: Server, prompts: list[str], concurrency: int, new_tokens: int) -> dict:
    """Keep ``concurrency`` requests in flight until 2·concurrency (at least 4) have finished."""
    total = max(4, 2 * concurrency)
    queue = [prompts[i % len(prompts)] for i in range(total)]
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        async def worker() -> None:
            while queue:
                results.append(await one_request(http, server, queue.pop(), new_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": total, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
        "ttft_p50_s": statistics.median(r["ttft"] for r in results),
        "ttft_p95_s": percentile([r["ttft"] for r in results], 0.95),
        "e2e_p50_s": statistics.median(r["e2e"] for r in results),
        "e2e_p95_s": percentile([r["e2e"] for r in results], 0.95),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["concurrency"]
    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for system in report["systems"]:
        rows = report["results"][system]
        throughput.plot(levels, [rows[str(c)]["tokens_per_s"] for c in levels], marker="o", label=system)
        ttft.plot(levels, [rows[str(c)]["ttft_p95_s"] for c in levels], marker="o", label=system)
    limit = statistics.mean(direct["tokens_per_s"] for direct in report["direct"].values())
    throughput.axhline(limit, color="grey", linestyle="--", label="one generate (32), mean")
    throughput.set(xlabel="concurrent requests", ylabel="generated tokens/s", xscale="log", title="throughput")
    ttft.set(xlabel="concurrent requests", ylabel="seconds", xscale="log", yscale="log",
             title="p95 time to first token")
    for axis in (throughput, ttft):
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.legend()
    figure.suptitle(f"serve_load: {report['model']['parameters'] / 1e6:.1f}M GPT-2, {report['new_tokens']} new "
                    f"tokens, {report['threads']} threads, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU host (every system and the limit)")
    parser.add_argument("--naive-server", nargs=3, metavar=("MODEL_DIR", "DEVICE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        torch.set_num_threads(args.threads)
        naive_server(args.naive_server[0], int(args.naive_server[2]), args.naive_server[1])
        return

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model, tokenizer, prompt_ids = build(model_dir)
        model = model.to(args.device)
        prompts = [tokenizer.decode(ids) for ids in prompt_ids]
        run_direct(model, tokenizer, prompt_ids[:4], 8)  # warm-up
        results: dict[str, dict] = {}
        directs: dict[str, dict] = {}
        for system in args.systems:
            before = measure_direct(model, tokenizer, prompt_ids, args.new_tokens)
            with Server(system, model_dir, args.threads, args.device) as server:
                asyncio.run(load(server, prompts[:2], 2, 8))  # warm-up
                results[system] = {str(c): asyncio.run(load(server, prompts, c, args.new_tokens))
                                   for c in args.concurrency}
                print(system, json.dumps(results[system]), file=sys.stderr)
            after = measure_direct(model, tokenizer, prompt_ids, args.new_tokens)
            directs[system] = {"before": before, "after": after,
                               "tokens_per_s": (before["tokens_per_s"] + after["tokens_per_s"]) / 2}

    top = str(max(args.concurrency))
    report = {
        "load_average_1m": os.getloadavg()[0],
        "model": {"parameters": parameter_count(model), "vocab": len(tokenizer)},
        "new_tokens": args.new_tokens, "threads": args.threads, "concurrency": args.concurrency,
        "systems": args.systems, "direct": directs, "results": results,
        f"ratio_vs_direct_at_{top}": {s: results[s][top]["tokens_per_s"] / directs[s]["tokens_per_s"] for s in results},
    }
    if "genloop" in results and "1" in results["genloop"]:
        report[f"genloop_ttft_p95_at_{top}_vs_single"] = (results["genloop"][top]["ttft_p95_s"]
                                                          / results["genloop"]["1"]["ttft_p50_s"])
    emit(report, args.out)
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
