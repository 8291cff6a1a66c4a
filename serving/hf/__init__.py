"""The HF engine: a transformers model served with continuous batching, split along its jobs as vLLM's is.

- ``options``: ``HFEngineOptions``, the engine's tunables (the user config reuses them);
- ``engine``: ``HFEngine``, the worker loop that ties the parts together and runs the model's forward passes;
- ``scheduler``: which requests run when: admission, prefill groups, when to compact the batch;
- ``sequence``: one request's state, from submission to its last token;
- ``kv_batch``: the running batch's left-padded KV cache, and rows joining and leaving it;
- ``sampler``: penalties, then greedy or seeded temperature / top-k / top-p sampling;
- ``detokenizer``: incremental detokenization and stop strings;
- ``logprobs``: the logprobs of sampled and prompt tokens, as vLLM reports them;
- ``structured``: response_format, JSON enforced per row by constrained decoding (llguidance);
- ``model_prep``: fused GELU and int8 quantisation of the loaded model.

Import from the modules (``serving.hf.engine``, ``serving.hf.options``): the user config imports the
options, and this file stays empty so that doing so does not load torch and transformers.
"""
