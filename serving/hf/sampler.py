"""The next token of each row: presence / frequency penalties, then greedy or sampled.

Greedy rows are one vectorised argmax. Sampled rows are filtered together (temperature, top-k,
top-p); each row then draws a single uniform from its own seeded generator, so a seeded request
samples the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch

from genloop.serving.hf.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row of ``logits`` [rows, vocab], row i for ``seqs[i]``; counts the tokens of
    penalised rows for their next step."""
    logits = logits.float()
    penalised = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    for i in penalised:
        counts = seqs[i].counts
        if counts is not None:
            p = seqs[i].params
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    tokens = logits.argmax(-1).tolist()
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if sampled:
        for i, token in zip(sampled, _sample_rows(logits[sampled], [seqs[i] for i in sampled])):
            tokens[i] = token
    for i in penalised:
        seq = seqs[i]
        if seq.counts is None:
            seq.counts = torch.zeros(logits.shape[-1], device=logits.device)
        seq.counts[tokens[i]] += 1
    return tokens


def _sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Temperature, top-k and top-p applied to all rows at once, then one seeded draw per row."""
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
    cumulative = probs.cumsum(-1)
    draws = torch.stack([torch.rand((), generator=s.generator) for s in seqs]).to(device)
    picked = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True)
    picked = picked.clamp(max=ordered.shape[-1] - 1)
    return order.gather(1, picked).squeeze(1).tolist()
