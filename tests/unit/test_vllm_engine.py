"""VLLMEngine without vLLM: the module imports and load() says what to install.

vLLM needs a CUDA GPU and is an optional extra, so it is not installed here and the engine itself
cannot run in these tests; serving real traffic through it belongs to tests/gpu/.
"""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass

import pytest

from genloop.serving.engine import EngineError, GenerationRequest, PositionLogprobs, SamplingParams
from genloop.serving.vllm_engine import VLLMEngine, position_logprobs, sampling_kwargs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")


def test_load_without_vllm_names_the_extra(tmp_path):
    engine = VLLMEngine(tmp_path, "v1")
    assert engine.model_version == "v1"
    assert "temperature" in engine.supported_params and "n" not in engine.supported_params

    async def main():
        assert not await engine.health()
        with pytest.raises(EngineError, match=r"genloop\[vllm\]"):
            await engine.load()
        with pytest.raises(EngineError, match="not loaded"):
            await engine.generate(GenerationRequest(prompt="hello"))
        with pytest.raises(EngineError, match="not loaded"):
            engine.render_chat([{"role": "user", "content": "hi"}])
        await engine.close()  # closing an engine that never loaded is harmless

    asyncio.run(main())


def test_sampling_parameters_reach_vllm_under_vllms_names():
    """vLLM's SamplingParams takes every sampling field under the same name; top_k only when set (vLLM's
    own default keeps all tokens), and one completion per request (the API fans n out)."""
    params = SamplingParams(max_tokens=20, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2,
                            min_tokens=3, ignore_eos=True, stop="x", seed=7, presence_penalty=0.5,
                            frequency_penalty=0.25)
    expected = {"n": 1, "max_tokens": 20, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
                "repetition_penalty": 1.2, "min_tokens": 3, "ignore_eos": True, "stop": ["x"], "seed": 7,
                "presence_penalty": 0.5, "frequency_penalty": 0.25}
    kwargs = sampling_kwargs(params)
    assert {name: kwargs[name] for name in expected} == expected
    plain = sampling_kwargs(SamplingParams())
    assert "top_k" not in plain and plain["stop"] is None
    assert (plain["min_p"], plain["repetition_penalty"], plain["min_tokens"], plain["ignore_eos"]) == (0, 1, 0, False)


@dataclass
class VLLMLogprob:
    """vLLM's ``vllm.logprobs.Logprob``, field for field: what its outputs carry for each token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def test_logprobs_and_response_format_reach_vllm_and_come_back_in_the_engines_shape():
    kwargs = sampling_kwargs(SamplingParams(max_tokens=0, logprobs=2, prompt_logprobs=1,
                                            json_schema={"type": "object"}))
    assert (kwargs["max_tokens"], kwargs["logprobs"], kwargs["prompt_logprobs"]) == (1, 2, 1)  # 0: vLLM's one dropped
    assert kwargs["structured_outputs"] == {"json": {"type": "object"}, "disable_any_whitespace": True}
    plain = sampling_kwargs(SamplingParams())
    assert "structured_outputs" not in plain and plain["logprobs"] is plain["prompt_logprobs"] is None

    # Per position vLLM maps the token's id and the `top` most likely ones' to their Logprob; a prompt's
    # first position has none. Token 5 was sampled at rank 4: it is reported, not among the top two.
    steps = [None,
             {7: VLLMLogprob(-0.1, 1, "a"), 9: VLLMLogprob(-2.5, 2, "b")},
             {5: VLLMLogprob(-3.0, 4, None), 7: VLLMLogprob(-0.2, 1, "a"), 9: VLLMLogprob(-1.9, 2, "b")}]
    entries = position_logprobs([3, 7, 5], steps, 2, text=lambda token: f"<{token}>")
    assert entries[0] == PositionLogprobs(token_id=3, token="<3>", logprob=None)
    assert (entries[1].token, entries[1].logprob, [t.token_id for t in entries[1].top]) == ("a", -0.1, [7, 9])
    assert (entries[2].token, entries[2].logprob) == ("<5>", -3.0)
    assert [(t.token_id, t.token, t.logprob) for t in entries[2].top] == [(7, "a", -0.2), (9, "b", -1.9)]
    assert position_logprobs([7], steps[1:2], 0, text=str)[0].top == []


@dataclass
class VLLMSchedulerStats:
    """The fields of vLLM's ``vllm.v1.metrics.stats.SchedulerStats`` the engine reads, as vLLM names them."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0


def test_running_and_waiting_are_what_vllms_schedulers_last_reported(tmp_path):
    """vLLM calls the stat-logger factory once per engine core and each logger's record after every step
    of its core, with scheduler stats or None (a step that reports only iteration stats)."""
    engine = VLLMEngine(tmp_path, "v1")
    assert (engine.num_active, engine.num_waiting) == (0, 0)
    cores = [engine.stat_logger(None, index) for index in (0, 1)]
    cores[0].record(VLLMSchedulerStats(num_running_reqs=3, num_waiting_reqs=2), None, None, engine_idx=0)
    cores[1].record(VLLMSchedulerStats(num_running_reqs=4), None, mm_cache_stats=None, engine_idx=1)
    cores[0].record(None, object())  # no scheduler stats this step: the last ones stand
    assert (engine.num_active, engine.num_waiting) == (7, 2)
    cores[0].record(VLLMSchedulerStats(), None)  # its batch drained
    assert (engine.num_active, engine.num_waiting) == (4, 0)
    cores[0].log()
    cores[0].log_engine_initialized()
