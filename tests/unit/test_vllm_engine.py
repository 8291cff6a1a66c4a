"""VLLMEngine without vLLM: the module imports and load() says what to install.

vLLM needs a CUDA GPU and is an optional extra, so it is not installed here and the engine itself
cannot run in these tests; serving real traffic through it belongs to tests/gpu/.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from genloop.serving.engine import EngineError, GenerationRequest
from genloop.serving.vllm_engine import VLLMEngine

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
