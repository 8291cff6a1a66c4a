"""The demo's traffic is meant to be served: it sends only prompts the champion's context takes."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from genloop.services.demo import ANSWER_TOKENS, fitting


def test_prompts_longer_than_the_context_less_the_answer_are_not_sent(make_tiny_model):
    model_dir = make_tiny_model()
    context = AutoConfig.from_pretrained(model_dir).n_positions
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["short prompt", "word " * 20, "https://example.org/licence/" + "0a1b2c3d" * (context // 4),
               "word " * 2 * context]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    kept = fitting(prompts, model_dir)
    assert kept == [p for p, n in zip(prompts, lengths, strict=True) if n <= context - ANSWER_TOKENS]
    assert prompts[0] in kept and prompts[3] not in kept and len(kept) < len(prompts)
    assert fitting([], model_dir) == []
