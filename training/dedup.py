"""Near-duplicate detection across a Ray cluster: MinHash LSH bands grouped by Ray Data, not one index.

The documents stay in Ray's object store on the nodes that cleaned them; the driver holds none of
them, so its memory does not grow with the corpus (the single-process LSH this replaces needed
about 5 KB of driver memory per document). The steps, each a Ray Data operation:

1. ``band_rows``: each document's signature cut into the LSH bands (a 64-bit key per band).
2. Hash-partitioned by band key, each partition keeps the rows of keys shared by two or more
   documents: the candidate buckets. Most documents share no band and stop here.
3. The bucket members are joined with their signatures and content hashes, hash-partitioned by key
   again, and each bucket is verified: same content hash is an exact duplicate, an estimated Jaccard
   similarity at or above the threshold is a near one. The result is a small edge list (earlier
   document, later document, exact?).
4. One task walks the edges in document order and keeps a document unless an earlier *kept*
   document is its duplicate. That is the rule the driver-side index applied ("first seen is kept",
   compared with the kept ones only), so the same documents are kept; only documents with an edge
   are in memory there, a few bytes each.

``order`` is a document's place in the input: earlier sources, files and lines first. Documents of
the version being extended come first of all (``EXTENDED``) and are always kept.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from datasketch import MinHashLSH

from genloop.training.cleaning import EXACT_DUPLICATE, NEAR_DUPLICATE

#: A document's order is its source's number << SOURCE_SHIFT | its place in the source; source 0, the
#: orders below EXTENDED, is the extended version's documents (kept whatever follows them).
SOURCE_SHIFT = 56
EXTENDED = 1 << SOURCE_SHIFT
_FNV_PRIME = np.uint64(0x100000001B3)
_GOLDEN = 0x9E3779B97F4A7C15
_NO_EDGES = pa.table({"i": pa.array([], pa.int64()), "j": pa.array([], pa.int64()),
                      "exact": pa.array([], pa.bool_())})
#: Pairs compared at once while verifying a bucket: bounds that step's memory (rows × bucket × perms bytes).
_VERIFY_ROWS = 64


@functools.lru_cache
def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): datasketch's optimum for the threshold, weighted to miss few duplicates
    (false candidates cost a comparison, missed ones a duplicate in the data)."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def band_keys(signatures: np.ndarray, b: int, r: int) -> np.ndarray:
    """(documents, b) int64 keys: equal when a band's r hash values are equal (FNV-1a over them,
    seeded by the band's number). A 64-bit collision only adds a candidate, which verification drops."""
    values = signatures.astype(np.uint64)
    keys = np.empty((len(values), b), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(b):
            key = np.full(len(values), np.uint64((_GOLDEN * (band + 1)) % 2**64))
            for column in range(band * r, (band + 1) * r):
                key = (key ^ values[:, column]) * _FNV_PRIME
            keys[:, band] = key
    return keys.view(np.int64)


def signature_matrix(column: pa.ChunkedArray | pa.Array, num_perm: int) -> np.ndarray:
    """A fixed-size-list column of signatures as one (rows, num_perm) uint32 array, without copying rows."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), num_perm)


def _band_rows(batch: pa.Table, b: int, r: int, num_perm: int) -> pa.Table:
    keys = band_keys(signature_matrix(batch.column("signature"), num_perm), b, r)
    order = batch.column("order").to_numpy()
    return pa.table({"key": keys.ravel(), "order": np.repeat(order, b)})


def _shared_keys(block: pa.Table) -> pa.Table:
    """Rows of one hash partition whose key two or more documents share."""
    keys = block.column("key").to_numpy()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return block.filter(pa.array(counts[inverse] >= 2))


def _verify(block: pa.Table, threshold: float, num_perm: int) -> pa.Table:
    """Edges (i, j, exact) with i before j, for every verified pair of one partition's buckets."""
    keys = block.column("key").to_numpy()
    order = block.column("order").to_numpy()
    hashes = np.asarray(block.column("content_hash").to_pylist(), dtype=object)
    signatures = signature_matrix(block.column("signature"), num_perm)
    sort = np.lexsort((order, keys))
    keys, order, hashes, signatures = keys[sort], order[sort], hashes[sort], signatures[sort]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    found: list[tuple[np.ndarray, np.ndarray, bool]] = []
    needed = int(np.ceil(threshold * num_perm - 1e-9))  # equal values for a similarity >= threshold
    for start, end in zip(starts, ends, strict=True):
        members = order[start:end]
        # A repeated content hash is an exact duplicate of its first occurrence; only first
        # occurrences are compared pairwise, which keeps a bucket of copies linear.
        _, first = np.unique(hashes[start:end], return_index=True)
        is_first = np.zeros(end - start, dtype=bool)
        is_first[first] = True
        if not is_first.all():
            first_of = {hashes[start + i]: members[i] for i in first}
            copies = np.flatnonzero(~is_first)
            found.append((np.array([first_of[hashes[start + i]] for i in copies]), members[copies], True))
        reps, sigs = members[is_first], signatures[start:end][is_first]
        for row in range(0, len(reps), _VERIFY_ROWS):
            equal = (sigs[row:row + _VERIFY_ROWS, None, :] == sigs[None, :, :]).sum(axis=2)
            i, j = np.nonzero(equal >= needed)
            later = reps[row + i] < reps[j]
            found.append((reps[row + i][later], reps[j][later], False))
    if not found:
        return _NO_EDGES
    return pa.table({
        "i": np.concatenate([e[0] for e in found]).astype(np.int64),
        "j": np.concatenate([e[1] for e in found]).astype(np.int64),
        "exact": np.concatenate([np.full(len(e[0]), e[2]) for e in found]),
    }, schema=_NO_EDGES.schema)


def _members(shared: pa.Table, docs: pa.Table) -> pa.Table:
    """The bucket rows (key, order) with each member's content hash and signature (pyarrow's join
    carries no list columns, so it joins row numbers and the signatures are taken by them)."""
    numbered = pa.table({"order": docs.column("order"), "row": pa.array(np.arange(docs.num_rows))})
    joined = shared.join(numbered, "order", join_type="inner")
    rows = joined.column("row")
    return joined.drop_columns(["row"]).append_column("content_hash", docs.column("content_hash").take(rows)) \
        .append_column("signature", docs.column("signature").take(rows))


def edges(band_rows: pa.Table, docs: pa.Table, threshold: float, num_perm: int) -> pa.Table:
    """Steps 2 and 3 on one partition: ``band_rows`` (key, order) and ``docs`` (order, content_hash,
    signature) hold every row of their keys and orders."""
    return _verify(_members(_shared_keys(band_rows), docs), threshold, num_perm)


@ray.remote
def _edges_of_one_partition(band_refs: list[ray.ObjectRef], doc_refs: list[ray.ObjectRef], threshold: float,
                            num_perm: int) -> pa.Table:
    """``edges`` for a corpus that is one partition, with no shuffle (a Ray Data shuffle costs seconds
    of fixed overhead, which dominates below a few ten thousand documents)."""
    docs = pa.concat_tables([t.select(["order", "content_hash", "signature"]) for t in ray.get(doc_refs)
                             if t.num_rows])
    return edges(pa.concat_tables([t for t in ray.get(band_refs) if t.num_rows]), docs, threshold, num_perm)


def first_seen_is_kept(edges: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
    """Step 4: the orders of the documents to drop (sorted) and how many for each reason.

    Walks the later documents in order, so every earlier one is decided when it is consulted."""
    dropped: dict[int, str] = {}
    if edges.num_rows:
        i, j, exact = (edges.column(c).to_numpy() for c in ("i", "j", "exact"))
        sort = np.lexsort((i, j))
        current, is_copy, has_kept_twin = -1, False, False

        def decide() -> None:
            if current >= EXTENDED and (is_copy or has_kept_twin):
                dropped[current] = EXACT_DUPLICATE if is_copy else NEAR_DUPLICATE

        for earlier, later, same in zip(i[sort].tolist(), j[sort].tolist(), exact[sort].tolist(), strict=True):
            if later != current:
                decide()
                current, is_copy, has_kept_twin = later, False, False
            is_copy |= same
            has_kept_twin |= not same and earlier not in dropped
        decide()
    counts = {EXACT_DUPLICATE: 0, NEAR_DUPLICATE: 0}
    for reason in dropped.values():
        counts[reason] += 1
    return np.array(sorted(dropped), dtype=np.int64), counts


@ray.remote(num_returns=2)
def _first_seen_is_kept(edge_refs: list[ray.ObjectRef]) -> tuple[np.ndarray, dict[str, int]]:
    return first_seen_is_kept(pa.concat_tables([t for t in ray.get(edge_refs) if t.num_rows] or [_NO_EDGES]))




def duplicates(docs: ray.data.Dataset, threshold: float, num_perm: int,
               partitions: int) -> tuple[ray.ObjectRef, dict[str, int]]:
    """The duplicates among ``docs`` (a materialized dataset with columns order, content_hash,
    signature): a reference to the sorted orders to drop, for ``drop_duplicates``, and the count
    per reason.

    ``partitions`` is the number of hash partitions of the shuffles (about one per 20 k documents);
    with one, steps 2 and 3 run in one task."""
    b, r = bands(threshold, num_perm)
    band = docs.map_batches(_band_rows, fn_kwargs={"b": b, "r": r, "num_perm": num_perm},
                            batch_format="pyarrow", batch_size=4096)
    if partitions == 1:
        edge_refs = [_edges_of_one_partition.remote(list(band.materialize().to_arrow_refs()),
                                                    list(docs.to_arrow_refs()), threshold, num_perm)]
    else:
        shared = band.repartition(partitions, keys=["key"]).map_batches(_shared_keys, batch_format="pyarrow",
                                                                        batch_size=None)
        members = shared.join(docs.select_columns(["order", "content_hash", "signature"]), join_type="inner",
                              num_partitions=partitions, on=("order",))
        found = (members.repartition(partitions, keys=["key"])
                 .map_batches(_verify, fn_kwargs={"threshold": threshold, "num_perm": num_perm},
                              batch_format="pyarrow", batch_size=None))
        edge_refs = list(found.materialize().to_arrow_refs())
    dropped, counts = _first_seen_is_kept.remote(edge_refs)
    return dropped, ray.get(counts)


_resolved: dict[str, np.ndarray] = {}


def drop_duplicates(batch: pa.Table, dropped: Any) -> pa.Table:
    """map_batches: the rows whose order is not among ``dropped`` (a reference from ``duplicates``,
    fetched once per worker process)."""
    key = dropped.hex()
    if key not in _resolved:
        _resolved.clear()
        _resolved[key] = ray.get(dropped)
    orders = batch.column("order").to_numpy()
    return batch.filter(pa.array(~np.isin(orders, _resolved[key], assume_unique=False)))
