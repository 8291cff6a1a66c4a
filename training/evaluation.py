"""The numbers the evaluation gate compares between a candidate model and the champion.

Both models are scored on the same held-out texts, but they may not share a tokenizer (a model
trained from scratch trains its own BPE), so everything the gate compares is defined on text:
bits per byte normalises the log-likelihood by UTF-8 bytes instead of tokens, and continuation
quality (BLEU, chrF, ROUGE-L) compares decoded text with the text that really followed. Token-level
perplexity is reported as well, because it is the number people know, but it only compares models
that share a tokenizer.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import sacrebleu
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from rouge_score import rouge_scorer
from transformers import AutoTokenizer

from genloop.training.errors import UserInputError
from genloop.training.models import load_model, parameter_count

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Prompt:
    """One held-out continuation task: the start of a text and the words that really followed."""

    prompt: str  # the text up to the end of its prompt_words-th word, spacing and newlines kept
    reference: str  # the next reference_words words, from the first one's start, spacing kept


Better = Literal["lower", "higher"]


def _compared(description: str, better: Better) -> Any:
    """A field the gate compares between models, with the direction that is better."""
    return Field(description=description, json_schema_extra={"better": better})


class SetMetrics(BaseModel):
    """One model's numbers on one held-out set.

    The fields that say which way is better are the gate's metrics: the names a gate rule may use
    (``training.config.GateMetric``), the columns of the report and the values the control plane
    exports. The others count what was scored.
    """

    perplexity: float = _compared(
        "Token-level perplexity, sliding window; comparable only between models sharing a tokenizer.", "lower"
    )
    bits_per_byte: float = _compared(
        "Total negative log-likelihood in bits per UTF-8 byte of the texts: tokenizer-independent.", "lower"
    )
    bleu: float = _compared("Corpus BLEU (0-100) of greedy continuations against the references.", "higher")
    chrf: float = _compared("Corpus chrF (0-100) of greedy continuations against the references.", "higher")
    rouge_l: float = _compared("Mean ROUGE-L F1 (0-1) of greedy continuations against the references.", "higher")
    ms_per_token: float = _compared("Greedy generation latency per generated token, milliseconds.", "lower")
    texts: int = Field(description="Texts scored for perplexity.")
    tokens: int = Field(description="Tokens predicted for perplexity.")
    prompts: int = Field(description="Prompts continued.")

    def compared(self) -> dict[str, float]:
        """The gate's metrics and their values, in field order."""
        return {name: getattr(self, name) for name in BETTER}


# Gate metric → "lower" or "higher", whichever is better: read off SetMetrics' fields, in their order.
BETTER: dict[str, Better] = {
    name: cast(Better, field.json_schema_extra["better"])
    for name, field in SetMetrics.model_fields.items()
    if isinstance(field.json_schema_extra, dict) and "better" in field.json_schema_extra
}


def _cut_words(text: str, n: int) -> str:
    """``text`` up to the end of its ``n``-th word, original spacing kept (all of it if shorter)."""
    words = list(_WORD.finditer(text))
    return text[: words[n - 1].end()] if len(words) >= n else text


def make_prompts(texts: list[str], n: int, prompt_words: int, reference_words: int, seed: int) -> list[Prompt]:
    """Up to ``n`` prompts from texts long enough for both parts; same arguments, same prompts.

    Cutting the original text at word boundaries (rather than re-joining split words) keeps
    newlines and indentation, which matter for code and verse.
    """
    if prompt_words < 1 or reference_words < 1:
        raise UserInputError(
            f"prompt_words ({prompt_words}) and reference_words ({reference_words}) must be at least 1"
        )
    needed = prompt_words + reference_words
    candidates: list[Prompt] = []
    for text in texts:
        words = list(_WORD.finditer(text))
        if len(words) < needed:
            continue
        candidates.append(Prompt(
            prompt=text[: words[prompt_words - 1].end()],
            reference=text[words[prompt_words].start(): words[needed - 1].end()],
        ))
    if len(candidates) < n:
        logger.info("%d of %d held-out texts have %d words for a prompt", len(candidates), len(texts), needed)
    return random.Random(seed).sample(candidates, min(n, len(candidates)))


def continuation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100) and mean ROUGE-L F1 (0-1) of hypotheses against references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
        "rouge_l": sum(rouge) / len(rouge),
    }


def _windows(length: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target) of each window over a sequence of ``length`` tokens.

    The first window covers the first ``block_size`` tokens and scores all of them but the first;
    each later window ends ``stride`` tokens further and scores only those new tokens, with the
    preceding ``block_size - stride`` tokens as context. So every token after the first is
    scored exactly once, and never without context (hence ``stride < block_size``).
    """
    end = min(block_size, length)
    windows = [(0, end, 1)]
    while end < length:
        new_end = min(end + stride, length)
        windows.append((max(0, new_end - block_size), new_end, end))
        end = new_end
    return windows


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _negative_log_likelihood(
    model: torch.nn.Module, texts: list[str], tokenizer: Any, block_size: int, stride: int, batch_size: int
) -> tuple[float, int, int, int]:
    """Summed NLL in nats, predicted tokens, texts scored, and UTF-8 bytes of those texts."""
    # Training packs documents each closed by end-of-text, so end-of-text is what precedes every
    # document the model saw: starting from it lets the model predict the first real token too,
    # so the NLL covers every byte of the text, which bits per byte assumes.
    prefix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces: list[tuple[list[int], int]] = []  # window tokens, index of the first scored one
    scored_texts = scored_bytes = 0
    for text in texts:
        ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        scored_texts += 1
        scored_bytes += len(text.encode("utf-8"))
        for begin, end, first in _windows(len(ids), block_size, stride):
            pieces.append((ids[begin:end], first - begin))
    pieces.sort(key=lambda piece: len(piece[0]))  # similar lengths together: less padding

    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start: start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        # Right padding: causal attention never lets a real token see the pads after it.
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width - 1, dtype=torch.bool)  # over shifted targets
        for row, (ids, first) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            scored[row, first - 1: len(ids) - 1] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(device), reduction="none"
        )
        mask = scored.to(device)
        total_nll += float(nll[mask].sum())
        total_tokens += int(mask.sum())
    return total_nll, total_tokens, scored_texts, scored_bytes


def _generate(
    model: torch.nn.Module, tokenizer: Any, prompts: list[Prompt], max_prompt_tokens: int,
    max_new_tokens: int, batch_size: int,
) -> tuple[list[list[int]], float]:
    """Greedy continuations (token ids, cut after eos) and the milliseconds spent in generate."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    device = _device(model)
    outputs: list[list[int]] = []
    elapsed = 0.0
    for start in range(0, len(prompts), batch_size):
        encoded = [
            tokenizer(p.prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
            for p in prompts[start: start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        # Left padding, built here rather than by flipping tokenizer.padding_side, so the caller's
        # tokenizer is left as it was; generate derives positions from the attention mask.
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        began = time.perf_counter()
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
        )
        elapsed += time.perf_counter() - began
        for row in generated[:, width:].tolist():
            outputs.append(row[: row.index(eos) + 1] if eos in row else row)
    return outputs, elapsed * 1000


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    prompts: list[Prompt],
    *,
    block_size: int,
    stride: int,
    max_new_tokens: int,
    reference_words: int,
    batch_size: int = 8,
) -> tuple[SetMetrics, list[str]]:
    """Score ``model`` on one held-out set: the metrics and its continuation of each prompt.

    Continuations are cut to ``reference_words`` words (the reference's length, so BLEU's brevity
    penalty and ROUGE's recall compare like with like) and stripped, in prompt order.
    """
    if stride >= block_size:
        # stride == block_size would leave the first token of each window without context.
        logger.warning("stride %d ≥ context %d: using stride %d", stride, block_size, block_size - 1)
        stride = block_size - 1
    if stride < 1 or batch_size < 1:
        raise UserInputError(f"stride ({stride}) and batch_size ({batch_size}) must be at least 1")
    if prompts and max_new_tokens >= block_size:
        raise UserInputError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in a {block_size}-token context"
        )

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            nll, tokens, scored_texts, scored_bytes = _negative_log_likelihood(
                model, texts, tokenizer, block_size, stride, batch_size
            )
            generated, elapsed_ms = _generate(
                model, tokenizer, prompts, block_size - max_new_tokens, max_new_tokens, batch_size
            )
    finally:
        model.train(was_training)
    if tokens == 0:
        raise UserInputError(f"none of the {len(texts)} held-out texts has a token to score")

    continuations = [
        _cut_words(tokenizer.decode(ids, skip_special_tokens=True), reference_words).strip() for ids in generated
    ]
    generated_tokens = sum(len(ids) for ids in generated)
    metrics = SetMetrics(
        perplexity=math.exp(nll / tokens),
        bits_per_byte=nll / math.log(2) / scored_bytes,
        **continuation_scores(continuations, [p.reference for p in prompts]),
        ms_per_token=elapsed_ms / generated_tokens if generated_tokens else 0.0,
        texts=scored_texts,
        tokens=tokens,
        prompts=len(prompts),
    )
    logger.info("evaluated %d texts (%d tokens) and %d prompts: %s", scored_texts, tokens, len(prompts), metrics)
    return metrics, continuations


def model_size(model: torch.nn.Module, path: Path) -> dict[str, int]:
    """Parameters (tied weights once) and bytes of every file in the model folder."""
    files = [file for file in Path(path).rglob("*") if file.is_file()]
    return {"parameters": parameter_count(model), "size_on_disk_bytes": sum(file.stat().st_size for file in files)}


def load_for_evaluation(path: Path) -> tuple[torch.nn.Module, Any]:
    """Model (checked by ``training.models.load_model``) and tokenizer, in eval mode."""
    model = load_model(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot load tokenizer from {path}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return model, tokenizer
