"""Deduplication's steps on one partition, without Ray: bands, buckets, verification, first seen kept.

The distributed run (Ray Data shuffles and a join) applies the same functions per partition; the
ingest tests run it on a cluster. Every case here is also checked against the single-process index
genloop used before (``tests/dedup_reference.py``): the same documents must be kept.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from dedup_reference import reference_reasons
from prose import prose

from genloop.training.cleaning import EXACT_DUPLICATE, NEAR_DUPLICATE, content_hash, minhash_signatures
from genloop.training.config import DataConfig
from genloop.training.dedup import EXTENDED, _band_rows, band_keys, bands, edges, first_seen_is_kept

CONFIG = DataConfig()
def changed(text: str, positions: list[int]) -> str:
    words = text.split()
    for position in positions:
        words[position] = f"zeppelin{position}"
    return " ".join(words)


def reasons(texts: list[str], extended: int = 0, config: DataConfig = CONFIG) -> list[str | None]:
    """Each document's drop reason (None: kept) by the pipeline's steps; the first ``extended`` are
    the extended version's. Asserts that the old single-process index agrees on the new documents."""
    hashes = [content_hash(t) for t in texts]
    signatures = minhash_signatures(texts, config.minhash_num_perm, config.shingle_words)
    orders = [int(h[:13], 16) if i < extended else EXTENDED + i for i, h in enumerate(hashes)]
    signature_type = pa.list_(pa.uint32(), config.minhash_num_perm)
    docs = pa.table({"order": pa.array(orders, pa.int64()), "content_hash": hashes,
                     "signature": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(signatures)),
                                                                    type=signature_type)})
    b, r = bands(config.near_dup_threshold, config.minhash_num_perm)
    found = edges(_band_rows(docs, b, r, config.minhash_num_perm), docs, config.near_dup_threshold,
                  config.minhash_num_perm)
    dropped, counts = first_seen_is_kept(found)
    reason_of = dict(zip(dropped.tolist(), _reasons_in_order(found, dropped), strict=True))
    result = [reason_of.get(order) for order in orders]
    assert counts == {EXACT_DUPLICATE: result.count(EXACT_DUPLICATE), NEAR_DUPLICATE: result.count(NEAR_DUPLICATE)}
    expected = reference_reasons(hashes, signatures, config.near_dup_threshold, config.minhash_num_perm)
    assert result[extended:] == expected[extended:]
    return result


def _reasons_in_order(found: pa.Table, dropped: np.ndarray) -> list[str]:
    exact = set(found.filter(found.column("exact")).column("j").to_pylist())
    return [EXACT_DUPLICATE if order in exact else NEAR_DUPLICATE for order in dropped.tolist()]


def test_exact_duplicate_is_dropped_and_first_is_kept():
    doc = prose(1)
    assert reasons([doc, prose(2), doc, doc]) == [None, None, EXACT_DUPLICATE, EXACT_DUPLICATE]


def test_near_duplicate_with_one_word_changed_is_caught():
    doc = prose(3)
    assert reasons([doc, changed(doc, [30])]) == [None, NEAR_DUPLICATE]


def test_different_documents_are_all_kept():
    assert reasons([prose(4), prose(5), prose(6)]) == [None, None, None]


def test_a_chain_keeps_its_far_end_as_first_seen_does():
    """A ≈ B ≈ C but C is not like A: B goes, C stays, because B was dropped. Connected components
    would drop C with B; comparing with kept documents only does not."""
    a = prose(4, words=200, end="")
    b = changed(a, [20, 90, 160])
    c = changed(b, [55, 125, 190])
    assert reasons([a, b, c]) == [None, NEAR_DUPLICATE, None]


def test_a_copy_of_a_dropped_document_is_an_exact_duplicate():
    a = prose(7)
    b = changed(a, [10])
    assert reasons([a, b, b]) == [None, NEAR_DUPLICATE, EXACT_DUPLICATE]


def test_extended_documents_are_kept_and_drop_later_twins():
    a, b = prose(8), prose(9)
    result = reasons([a, changed(a, [5]), changed(a, [40]), b, b], extended=2)
    assert result == [None, None, NEAR_DUPLICATE, None, EXACT_DUPLICATE]


@pytest.mark.parametrize("seed", [0, 1])
def test_same_documents_kept_as_the_single_process_index_on_a_corpus_with_planted_twins(seed):
    """1,500 documents: originals, one-word and three-word edits, copies of either, in a random order."""
    rng = random.Random(seed)
    originals = [prose(1000 * seed + i, words=rng.randint(20, 150)) for i in range(600)]
    texts = list(originals)
    for _ in range(900):
        source = rng.choice(texts)
        kind = rng.random()
        words = len(source.split())
        edit = [rng.randrange(words) for _ in range(1 if kind < 0.4 else 3)]
        texts.append(source if kind > 0.8 else changed(source, edit))
    rng.shuffle(texts)
    result = reasons(texts)
    assert result.count(EXACT_DUPLICATE) > 50 and result.count(NEAR_DUPLICATE) > 200


def test_band_keys_change_only_with_their_band():
    b, r = bands(CONFIG.near_dup_threshold, CONFIG.minhash_num_perm)
    signature = np.arange(CONFIG.minhash_num_perm, dtype=np.uint32)[None, :]
    other = signature.copy()
    other[0, r + 1] += 1  # one value in the second band
    first, second = band_keys(signature, b, r)[0], band_keys(other, b, r)[0]
    assert (first != second).tolist() == [band == 1 for band in range(b)]
    assert len(set(first.tolist())) == b  # the same values in two bands give two keys
