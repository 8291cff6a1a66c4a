"""GPU path of serving: HFEngine on CUDA, and the Serve app on a replica that reserves the GPU.

Skipped without CUDA. In float64 (as the CPU engine tests) a padded, continuously batched run
must give exactly what ``model.generate`` gives for each prompt alone.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genloop.serving.app import serve_app
from genloop.serving.engine import GenerationRequest, SamplingParams
from genloop.serving.hf.engine import HFEngine
from genloop.serving.hf.options import HFEngineOptions
from genloop.serving.settings import DeploymentOptions, ServerSettings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["The for statement is used to", "A list", "Exceptions are raised when an error occurs and the",
           "def", "The with statement wraps the execution of a block"]


def test_engine_on_cuda_matches_generate(tmp_path, make_tiny_model):
    folder = make_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).to("cuda", torch.float64).eval()
    expected = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt").to("cuda")
        with torch.inference_mode():
            out = reference.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

    async def main():
        engine = HFEngine(folder, "gpu", device="cuda", dtype="float64", max_prefill_tokens=32)
        await engine.load()
        try:
            params = SamplingParams(max_tokens=16, temperature=0)
            return await asyncio.gather(*(engine.generate(GenerationRequest(prompt=p, params=params)) for p in PROMPTS))
        finally:
            await engine.close()

    assert [r.text for r in asyncio.run(main())] == expected


def test_serve_replica_reserves_the_gpu_and_answers(ray_cluster, tmp_path, make_tiny_model, free_port):
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": free_port})
    settings = ServerSettings(served_model_name="genloop", model_uri=str(make_tiny_model()),
                              model_version="1", engine_class=HFEngine,
                              engine_options=HFEngineOptions(device="cuda"))
    try:
        serve_app(settings, deployment=DeploymentOptions(replica_gpus=1.0))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{free_port}/v1", api_key="none", max_retries=0)
        completion = client.completions.create(model="genloop", prompt="The for statement", max_tokens=8,
                                               temperature=0)
        assert completion.usage.completion_tokens <= 8 and completion.choices[0].finish_reason in ("length", "stop")
    finally:
        serve.shutdown()
