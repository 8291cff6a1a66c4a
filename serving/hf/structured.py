"""response_format for the HF engine: JSON enforced by constrained decoding, with llguidance.

vLLM enforces response_format the same way, with xgrammar or llguidance. llguidance is the one here:
it runs on CPU, installs without CUDA, triton or a torch of its own (xgrammar's wheel pulls in
triton), and works with any transformers fast tokenizer, genloop's own byte-level BPE included.

Each constrained sequence has its own matcher, so any mix of constrained and free rows shares the
batch. Before sampling, the tokens a row's grammar forbids at this point get -inf in its row of
logits; the sampled token then advances the matcher. The completion finishes with "stop" as soon as
the JSON is complete (the grammar takes nothing more; neither ignore_eos nor min_tokens can make the
row go on past it into tokens no grammar allows); a max_tokens that runs out first finishes with
"length" and leaves the JSON cut short, as vLLM does.

The JSON is compact: no whitespace between its tokens. vLLM allows any whitespace there by default
(``disable_any_whitespace`` turns it off), which lets a small model spend its whole budget on
newlines, and genloop serves small models.
"""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.hf
import torch

from genloop.serving.engine import InvalidRequestError
from genloop.serving.hf.sequence import Sequence


class Grammars:
    """Compiles JSON Schemas into matchers over one model's tokenizer and vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]):
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)

    def matcher(self, schema: dict[str, Any]) -> llguidance.LLMatcher:
        """A fresh matcher for ``schema``; InvalidRequestError (param response_format) if it cannot be enforced."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise InvalidRequestError(f"response_format: {exc}", param="response_format") from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"response_format: the JSON schema cannot be enforced: {matcher.get_error()}",
                                      param="response_format")
        return matcher


def mask(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Set to -inf, in place, what each constrained row's grammar forbids as its next token."""
    rows = [i for i, s in enumerate(seqs) if s.matcher is not None and s.live]
    if not rows:
        return
    # One byte per token and row: 0 forbidden, 200 allowed.
    biases = bytearray(b"".join(seqs[i].matcher.compute_logit_bias() for i in rows))
    allowed = torch.frombuffer(biases, dtype=torch.uint8).view(len(rows), -1).to(logits.device)
    logits[rows] = logits[rows].masked_fill(allowed == 0, float("-inf"))


def advance(seq: Sequence, token: int) -> bool:
    """Feed ``seq``'s new token to its matcher; True once its grammar is complete (or broken), which ends
    the completion."""
    if seq.matcher is None:
        return False
    if not seq.matcher.is_stopped():
        seq.matcher.consume_token(token)
    return seq.matcher.is_stopped()
