"""The next token of each row, in vLLM's order: eos held back until ``min_tokens``, the repetition
penalty, presence / frequency penalties, then greedy or sampled.

Greedy rows are one vectorised argmax. Sampled rows are filtered together (temperature, top-k,
top-p, min-p); each row then draws a single uniform from its own seeded generator, so a seeded
request samples the same tokens whatever else shares the batch.

transformers has these filters as logits processors (``RepetitionPenaltyLogitsProcessor``,
``MinPLogitsWarper``, ``MinNewTokensLengthLogitsProcessor``), but each takes one value for the whole
batch (the repetition penalty also a history of one length for every row), while every row here
carries its own parameters and history; so the same formulas are written out below, once for all rows.
"""

from __future__ import annotations

import torch

from genloop.serving.hf.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: frozenset[int] = frozenset()) -> list[int]:
    """One token per row of ``logits`` [rows, vocab], row i for ``seqs[i]``, none of ``eos_ids`` for a
    row short of its ``min_tokens``; records the tokens of penalised rows for their next step."""
    logits = logits.float()
    early = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.params.min_tokens]
    if early and eos_ids:
        rows = torch.tensor(early, device=logits.device)[:, None]
        logits[rows, torch.tensor(sorted(eos_ids), device=logits.device)] = float("-inf")
    repeating = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if repeating:
        seen = torch.stack([_seen(seqs[i], logits) for i in repeating])
        penalty = torch.tensor([seqs[i].params.repetition_penalty for i in repeating], device=logits.device)[:, None]
        part = logits[repeating]
        logits[repeating] = torch.where(seen, torch.where(part > 0, part / penalty, part * penalty), part)
    penalised = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    for i in penalised:
        counts = seqs[i].counts
        if counts is not None:
            p = seqs[i].params
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    tokens = logits.argmax(-1).tolist()
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if sampled:
        for i, token in zip(sampled, _sample_rows(logits[sampled], [seqs[i] for i in sampled]), strict=True):
            tokens[i] = token
    for i in penalised:
        seq = seqs[i]
        if seq.counts is None:
            seq.counts = torch.zeros(logits.shape[-1], device=logits.device)
        seq.counts[tokens[i]] += 1
    for i in repeating:
        _seen(seqs[i], logits)[tokens[i]] = True
    return tokens


def _seen(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
    """Which tokens ``seq``'s prompt and output hold so far (vLLM's repetition penalty counts both)."""
    if seq.seen is None:
        seq.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        seq.seen[torch.tensor(seq.prompt_ids + seq.output_ids, device=logits.device)] = True
    return seq.seen


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Temperature, top-k, top-p and min-p applied to all rows at once, then one seeded draw per row."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
    ordered, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(ordered.shape[-1], device=device)
    top_k = torch.tensor([s.params.top_k or ordered.shape[-1] for s in seqs], device=device)
    ordered = ordered.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = ordered.softmax(-1)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    before = probs.cumsum(-1) - probs  # mass strictly ahead of each token; the first always stays
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    if any(s.params.min_p for s in seqs):  # probs is sorted: column 0 holds each row's most likely token
        min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    cumulative = probs.cumsum(-1)
    draws = torch.stack([torch.rand((), generator=s.generator) for s in seqs]).to(device)
    picked = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True)
    picked = picked.clamp(max=ordered.shape[-1] - 1)
    return order.gather(1, picked).squeeze(1).tolist()
