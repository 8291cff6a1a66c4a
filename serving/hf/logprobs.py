"""Logprobs of the HF engine's tokens, as vLLM reports them by default ("raw_logprobs").

A token's logprob is read from the model's own distribution at its position: the log-softmax of the
logits once a response_format has masked what it forbids, before penalties, temperature, top-k and
top-p reshape them for sampling. So it says how likely the model finds the token whatever settings
picked it, and a greedy token is always the most likely one. Only the rows that asked are computed,
from a copy taken before sampling (which may change the logits in place).
"""

from __future__ import annotations

from typing import Any

import torch

from genloop.serving.engine import Logprob, PositionLogprobs
from genloop.serving.hf.sequence import Sequence


class TokenTexts:
    """Each token's text, decoded once: every entry names its token and its alternatives'.

    Special tokens are spelled out (an end-of-text has a logprob too). Used by the engine's worker
    thread only.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the last axis, in float32 at least (half precision loses the small ones)."""
    return logits.log_softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def positions(logprobs: torch.Tensor, token_ids: list[int], top: list[int], text: TokenTexts) -> list[PositionLogprobs]:
    """One entry per row of ``logprobs`` [positions, vocab]: row i's token is ``token_ids[i]``, with its
    ``top[i]`` most likely alternatives."""
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None]).squeeze(1).tolist()
    values, indices = logprobs.topk(min(max(top, default=0), logprobs.shape[-1]), dim=-1)
    entries = []
    for token, logprob, k, ids, vals in zip(token_ids, chosen, top, indices.tolist(), values.tolist(), strict=True):
        alternatives = [Logprob.model_construct(token_id=i, token=text(i), logprob=v)
                        for i, v in zip(ids[:k], vals[:k], strict=True)]
        entries.append(PositionLogprobs.model_construct(token_id=token, token=text(token), logprob=logprob,
                                                        top=alternatives))
    return entries


class StepLogprobs:
    """One step's logprobs for the rows that asked: taken before sampling, described once the tokens
    are known."""

    def __init__(self, logits: torch.Tensor, seqs: list[Sequence]):
        self.rows = [i for i, s in enumerate(seqs) if s.logprobs is not None and s.live]
        self.tops = [seqs[i].params.logprobs or 0 for i in self.rows]
        self.values = log_softmax(logits[self.rows]) if self.rows else None

    def entries(self, tokens: list[int], text: TokenTexts) -> dict[int, PositionLogprobs]:
        """Row index → the entry of the token sampled in it."""
        if self.values is None:
            return {}
        entries = positions(self.values, [tokens[i] for i in self.rows], self.tops, text)
        return dict(zip(self.rows, entries, strict=True))


def prompt_entries(logits: torch.Tensor, prompt_ids: list[int], top: int, text: TokenTexts) -> list[PositionLogprobs]:
    """The prompt's logprobs from ``logits`` [len(prompt_ids), vocab], row j predicting token j + 1; the
    first token has none (nothing predicts it)."""
    first = PositionLogprobs.model_construct(token_id=prompt_ids[0], token=text(prompt_ids[0]), logprob=None, top=[])
    rest = prompt_ids[1:]
    if not rest:
        return [first]
    return [first, *positions(log_softmax(logits[: len(rest)]), rest, [top] * len(rest), text)]
