"""The running batch's KV cache, attention mask and positions, and how rows join and leave it.

The running batch keeps all sequences right-aligned in one left-padded KV cache with a 2-D attention
mask and per-sequence position ids, exactly the layout ``model.generate`` uses for a left-padded
batch, so greedy output matches ``generate`` token for token. Joining pads the narrower parts on the
left and concatenates along the batch; compaction selects the live rows and drops leading columns
that are padding in every row, so the cache is only as wide as the longest live sequence. Both
rebuild the cache, so finished rows are compacted in batches, not one by one (the rule is
``scheduler.rows_to_keep``). Between rebuilds, each layer's KV lives in a buffer with spare columns
that a step writes in place (``_BatchLayer``) instead of transformers' ``DynamicLayer``, which
re-allocates the whole cache at every token: on CPU that made 32-way decoding 20–40 % faster for a
1M- and a 12M-parameter GPT-2 (see benchmarks/engine_throughput.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from genloop.serving.hf.sequence import Sequence


class Rows(NamedTuple):
    """Rows of a batch and their state: the running batch, or a prefilled group about to join it."""

    seqs: list[Sequence]
    cache: DynamicCache  # per layer: keys, values [rows, heads, width, dim]
    mask: torch.Tensor  # [rows, width] 1 where the cache holds a real token
    positions: torch.Tensor  # [rows] position id of each row's next token
    last: torch.Tensor  # [rows] each row's latest token, the next step's input


def join(parts: list[Rows]) -> Rows:
    """``parts`` as one batch, in order: each left-padded to the widest, then concatenated."""
    width = max(part.mask.shape[1] for part in parts)
    pads = [width - part.mask.shape[1] for part in parts]
    layers = []
    for i in range(len(parts[0].cache.layers)):
        keys = torch.cat([_pad_left(part.cache.layers[i].keys, pad) for part, pad in zip(parts, pads, strict=True)])
        values = torch.cat([_pad_left(part.cache.layers[i].values, pad) for part, pad in zip(parts, pads, strict=True)])
        layers.append((keys, values))
    return Rows(
        seqs=[seq for part in parts for seq in part.seqs],
        cache=_batch_cache(layers),
        mask=torch.cat([_pad_left(part.mask, pad, dim=1) for part, pad in zip(parts, pads, strict=True)]),
        positions=torch.cat([part.positions for part in parts]),
        last=torch.cat([part.last for part in parts]),
    )


def compact(rows: Rows, keep: list[int]) -> Rows:
    """The rows ``keep`` (not empty) of ``rows``, without the leading columns that are padding in all of them."""
    index = torch.tensor(keep, device=rows.mask.device)
    mask = rows.mask.index_select(0, index)
    start = int(mask.any(0).int().argmax())  # first column some row still uses
    return Rows(
        seqs=[rows.seqs[i] for i in keep],
        cache=_batch_cache([
            (layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])
            for layer in rows.cache.layers
        ]),
        mask=mask[:, start:],
        positions=rows.positions.index_select(0, index),
        last=rows.last.index_select(0, index),
    )


class _BatchLayer(DynamicLayer):
    """One layer's KV for the running batch, in a buffer with spare columns.

    ``DynamicLayer`` grows by concatenation, re-allocating and copying the whole cache at every
    step; with 32 sequences that is megabytes per layer per token, fresh pages the allocator must
    fault in (worst on a non-main thread, whose malloc arena hands large blocks back to the OS).
    Writing the new column in place and exposing a view of the used part makes a step's cache cost
    proportional to the new token only; the buffer grows by half again when full.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.length = keys.shape[2]
        self._keys = self._allocate(keys)
        self._values = self._allocate(values)
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        self.device, self.is_initialized = keys.device, True

    def _allocate(self, used: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = used.shape
        buffer = used.new_empty((batch, heads, length + max(32, length // 2), dim))
        buffer[:, :, :length] = used
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[2]
        if self.length + new > self._keys.shape[2]:
            self._keys, self._values = self._allocate(self.keys), self._allocate(self.values)
        self._keys[:, :, self.length : self.length + new] = key_states
        self._values[:, :, self.length : self.length + new] = value_states
        self.length += new
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _batch_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache (what the model code expects) whose layers are in-place ``_BatchLayer`` buffers."""
    cache = DynamicCache()
    cache.layers = [_BatchLayer(keys, values) for keys, values in layers]
    cache.layer_class_to_replicate = None
    return cache


def _pad_left(tensor: torch.Tensor, count: int, dim: int = 2) -> torch.Tensor:
    """Prepend ``count`` zeros along ``dim`` (the sequence axis: 2 for KV tensors, 1 for masks)."""
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
