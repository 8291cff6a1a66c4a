"""Held-out metrics on a tiny model: likelihood, sliding windows, prompts, continuation scores, loading."""

from __future__ import annotations

import math
import re
from pathlib import Path
from pydoc_data.topics import topics
from typing import get_args

import pytest
import torch

from genloop.training.config import GateMetric
from genloop.training.errors import UserInputError
from genloop.training.evaluation import (
    BETTER,
    Prompt,
    SetMetrics,
    continuation_scores,
    evaluate_model,
    load_for_evaluation,
    make_prompts,
    model_size,
)
from genloop.training.models import build_model, parameter_count
from genloop.training.tokenizer import train_tokenizer

BLOCK = 64


def _paragraphs() -> list[str]:
    """Python's own documentation, split into paragraphs: real English with code, always installed."""
    found = []
    for name in sorted(topics):
        found.extend(p.strip() for p in topics[name].split("\n\n") if len(p.split()) >= 20)
    return found


PARAGRAPHS = _paragraphs()
TRAIN, HELD_OUT = PARAGRAPHS[:400], PARAGRAPHS[400:430]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TRAIN, vocab_size=1024)


@pytest.fixture(scope="module")
def untrained(tokenizer):
    return build_model("tiny", tokenizer, block_size=BLOCK, seed=0)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """The same initialisation after 30 AdamW steps on the training paragraphs."""
    model = build_model("tiny", tokenizer, block_size=BLOCK, seed=0)
    stream: list[int] = []
    for ids in tokenizer(TRAIN, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    blocks = torch.tensor(stream[: len(stream) // BLOCK * BLOCK]).view(-1, BLOCK)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        batch = blocks[torch.randint(len(blocks), (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _evaluate(model, tokenizer, texts, prompts=(), **overrides):
    settings = dict(block_size=BLOCK, stride=32, max_new_tokens=12, reference_words=8) | overrides
    return evaluate_model(model, tokenizer, texts, list(prompts), **settings)


def test_every_score_is_a_gate_metric_with_a_direction():
    """The gate's metrics are SetMetrics' float fields; GateMetric (the config's, spelled out to keep the
    config free of torch) must name exactly those."""
    scores = [name for name, field in SetMetrics.model_fields.items() if field.annotation is float]
    assert list(BETTER) == scores
    assert BETTER["bits_per_byte"] == "lower" and BETTER["chrf"] == "higher"
    assert set(get_args(GateMetric)) == set(BETTER)


def test_training_lowers_perplexity_and_bits_per_byte(tokenizer, untrained, trained):
    before, _ = _evaluate(untrained, tokenizer, HELD_OUT)
    after, _ = _evaluate(trained, tokenizer, HELD_OUT)
    assert after.perplexity < before.perplexity
    assert after.bits_per_byte < before.bits_per_byte
    # An untrained model is close to uniform over the vocabulary.
    assert before.perplexity == pytest.approx(len(tokenizer), rel=0.5)
    assert before.texts == after.texts == len(HELD_OUT)


@pytest.mark.parametrize("stride", [1, 7, 32, 63, 64, 500])
def test_sliding_window_scores_every_token_once(tokenizer, trained, stride):
    """With end-of-text in front, every token of every text is predicted exactly once, whatever the stride."""
    texts = ["\n\n".join(HELD_OUT[:4]), HELD_OUT[5], "x", ""]  # the first is several windows long
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert lengths[0] > 3 * BLOCK
    metrics, _ = _evaluate(trained, tokenizer, texts[:1] if stride == 1 else texts, stride=stride)
    assert metrics.tokens == (lengths[0] if stride == 1 else sum(lengths))
    assert metrics.texts == (1 if stride == 1 else 3)  # the empty text has nothing to predict


def test_single_window_perplexity_matches_the_models_own_loss(tokenizer, trained):
    text = HELD_OUT[0]
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 256
    with torch.no_grad():
        loss = trained(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    for stride in (16, 100):  # one window: the stride must not matter
        metrics, _ = _evaluate(trained, tokenizer, [text], block_size=256, stride=stride)
        assert metrics.perplexity == pytest.approx(math.exp(loss), rel=1e-4)
        bits = loss * (len(ids) - 1) / math.log(2)
        assert metrics.bits_per_byte == pytest.approx(bits / len(text.encode()), rel=1e-4)


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_batching_and_padding_do_not_change_the_numbers(request, tokenizer, which):
    """Prompts of different token lengths share a batch: pads must be invisible to the model.

    The untrained model matters here: its greedy output echoes its prompt, so a pad it attended to
    (a broken attention mask or position ids) changes the continuation; the briefly trained one
    mostly emits punctuation whatever it is given.
    """
    model = request.getfixturevalue(which)
    prompts = make_prompts(HELD_OUT, n=6, prompt_words=10, reference_words=8, seed=1)
    lengths = {len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1
    one, outputs_one = _evaluate(model, tokenizer, HELD_OUT[:8], prompts, batch_size=1)
    many, outputs_many = _evaluate(model, tokenizer, HELD_OUT[:8], prompts, batch_size=6)
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-4)
    assert many.bits_per_byte == pytest.approx(one.bits_per_byte, rel=1e-4)
    assert outputs_many == outputs_one


def test_continuations_are_cut_to_the_reference_length(tokenizer, trained):
    prompts = make_prompts(HELD_OUT, n=5, prompt_words=12, reference_words=6, seed=0)
    metrics, outputs = _evaluate(trained, tokenizer, HELD_OUT[:3], prompts, reference_words=6, max_new_tokens=20)
    assert len(outputs) == metrics.prompts == 5
    for output in outputs:
        assert len(output.split()) <= 6
        assert output == output.strip()
    assert metrics.ms_per_token > 0
    assert 0 <= metrics.bleu <= 100 and 0 <= metrics.chrf <= 100 and 0 <= metrics.rouge_l <= 1


def test_prompt_too_long_for_the_context_is_truncated_from_the_left(tokenizer, trained):
    long = " ".join(["word"] * 400) + " end of text here now"
    prompt = Prompt(prompt=long, reference="end of text")
    metrics, outputs = _evaluate(trained, tokenizer, [long], [prompt], max_new_tokens=8)
    assert metrics.prompts == 1 and len(outputs) == 1


def test_no_room_for_a_prompt_is_a_user_error(tokenizer, trained):
    prompt = Prompt(prompt="hello there", reference="general kenobi")
    with pytest.raises(UserInputError, match="max_new_tokens"):
        _evaluate(trained, tokenizer, HELD_OUT[:1], [prompt], max_new_tokens=BLOCK)


def test_make_prompts_is_deterministic_and_keeps_word_counts_and_spacing():
    texts = [
        "def f(x):\n    return x  +  1\n\n# a comment with words",
        "too short",
        *(f"text {i} " + " ".join(f"w{j}" for j in range(30)) for i in range(20)),
    ]
    first = make_prompts(texts, n=8, prompt_words=5, reference_words=4, seed=3)
    assert first == make_prompts(texts, n=8, prompt_words=5, reference_words=4, seed=3)
    assert first != make_prompts(texts, n=8, prompt_words=5, reference_words=4, seed=4)
    assert len(first) == 8
    for p in first:
        assert len(p.prompt.split()) == 5 and len(p.reference.split()) == 4
        source = next(t for t in texts if t.startswith(p.prompt))
        assert re.match(r"\s+", source[len(p.prompt):])
        assert source[len(p.prompt):].lstrip().startswith(p.reference)

    everything = make_prompts(texts, n=100, prompt_words=5, reference_words=4, seed=0)
    assert len(everything) == 21  # "too short" has 2 words
    code = next(p for p in everything if p.prompt.startswith("def"))
    assert code.prompt == "def f(x):\n    return x  +"  # newline and indentation kept
    assert code.reference == "1\n\n# a comment"
    with pytest.raises(UserInputError, match="prompt_words"):
        make_prompts(texts, n=8, prompt_words=0, reference_words=4, seed=0)


def test_perfect_continuations_score_full_marks():
    references = ["the quick brown fox jumps over", "lazy dogs sleep all day long", "print ( x ) + 1"]
    assert continuation_scores(references, references) == pytest.approx({"bleu": 100.0, "chrf": 100.0, "rouge_l": 1.0})
    worse = continuation_scores(["the quick red fox", "cats sleep", "print ( y )"], references)
    assert worse["bleu"] < 100 and worse["chrf"] < 100 and worse["rouge_l"] < 1
    assert continuation_scores([], []) == {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0}


def test_saved_model_loads_back_and_is_measured(tmp_path: Path, tokenizer, trained):
    trained.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_for_evaluation(tmp_path)
    original, _ = _evaluate(trained, tokenizer, HELD_OUT[:3])
    reloaded, _ = _evaluate(model, loaded_tokenizer, HELD_OUT[:3])
    assert reloaded.perplexity == pytest.approx(original.perplexity, rel=1e-5)

    size = model_size(model, tmp_path)
    assert size["parameters"] == parameter_count(trained)
    assert size["size_on_disk_bytes"] == sum(f.stat().st_size for f in tmp_path.iterdir() if f.is_file())
    assert size["size_on_disk_bytes"] > size["parameters"] * 4  # float32 weights and more


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing tensor", "deleted", "no folder"])
def test_a_damaged_model_folder_is_a_user_error(tmp_path: Path, tokenizer, untrained, damage):
    folder = tmp_path / "model"
    untrained.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00not a safetensors file" * 50)
    elif damage == "missing tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        del tensors[next(name for name in tensors if name.endswith("mlp.c_fc.weight"))]
        save_file(tensors, weights, metadata={"format": "pt"})
    elif damage == "deleted":
        weights.unlink()
    else:
        folder = tmp_path / "nowhere"
    with pytest.raises(UserInputError, match=re.escape(str(folder))):
        load_for_evaluation(folder)
