"""The single-process duplicate index genloop used before deduplication moved onto Ray Data.

Kept as the oracle the distributed pipeline (``training.dedup``) must agree with, document for
document, and as the baseline of ``benchmarks/ingest_scale.py``: it holds every kept document's
MinHash in one process's LSH, about 5 KB per document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

from genloop.training.cleaning import EXACT_DUPLICATE, MINHASH_SCHEME, MINHASH_SEED, NEAR_DUPLICATE


class DuplicateIndex:
    """Exact hashes seen so far plus a MinHash LSH of the documents kept; fed in input order, it
    keeps the first seen. LSH proposes candidates, the estimated Jaccard similarity confirms them."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.threshold = threshold
        self._seen: set[str] = set()
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self._kept: dict[str, LeanMinHash] = {}

    def add(self, doc_hash: str, signature: Sequence[int] | np.ndarray) -> str | None:
        """Register a document; return the duplicate reason if it must be dropped, else None."""
        if doc_hash in self._seen:
            return EXACT_DUPLICATE
        self._seen.add(doc_hash)
        sketch = LeanMinHash(seed=MINHASH_SEED, hashvalues=np.asarray(signature), scheme=MINHASH_SCHEME)
        for key in self._lsh.query(sketch):
            if sketch.jaccard(self._kept[key]) >= self.threshold:
                return NEAR_DUPLICATE
        self._lsh.insert(doc_hash, sketch)
        self._kept[doc_hash] = sketch
        return None


def reference_reasons(hashes: Sequence[str], signatures: Sequence[np.ndarray], threshold: float,
                      num_perm: int) -> list[str | None]:
    """The drop reason of each document, in input order (None: kept)."""
    index = DuplicateIndex(threshold, num_perm)
    return [index.add(h, s) for h, s in zip(hashes, signatures, strict=True)]
