"""``ingest``: sources in, a new version of a dataset out (the store is ``training.dataset_store``).

Re-ingesting unchanged sources does not create a new version: a version is identified by the
content hash of its documents and their splits.

Everything per document runs in Ray Data on the cluster's nodes: parsing, normalising, filtering,
hashing, MinHash signatures, and deduplication (``training.dedup``: LSH bands grouped by a hash
shuffle). The driver sees counts, and at the end streams the kept rows, sorted by content hash, into
the version's files one batch at a time, so its memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from genloop.training.cleaning import (
    DROP_REASONS,
    TRAIN,
    clean,
    content_hash,
    minhash_signatures,
    split_of,
)
from genloop.training.config import DataConfig
from genloop.training.dataset_store import (
    OUTPUT_SCHEMA,
    DatasetVersion,
    as_output,
    check_name,
    list_versions,
    write_version,
)
from genloop.training.dedup import SOURCE_SHIFT, drop_duplicates, duplicates
from genloop.training.errors import UserInputError
from genloop.training.sources import Source, resolve_source
from genloop.training.storage import filesystem, join

logger = logging.getLogger(__name__)

#: Sources per ingest: a source's number is the top bits of its documents' ``order`` (below 2**63).
MAX_SOURCES = 127
#: Documents per partition of the deduplication's shuffles.
ROWS_PER_PARTITION = 20_000


@dataclass(frozen=True)
class IngestResult:
    """The version an ingest produced; ``created`` is False when the input matched the latest version."""

    version: DatasetVersion
    created: bool


def ingest(sources: list[str | Source], name: str, data: DataConfig, datasets_dir: str | Path,
           extend: DatasetVersion | None = None, manifest_extra: dict[str, Any] | None = None,
           show_progress: bool = False) -> IngestResult:
    """Read, clean, deduplicate and split ``sources`` into a new version of dataset ``name``.

    All sources are checked before any work starts, and nothing is written until everything
    succeeded; the version appears at once (see ``dataset_store``), so a failure leaves no trace.
    ``extend`` keeps that version's documents as they are, first, and adds the sources' to them
    (deduplicated against them). ``manifest_extra`` goes into the manifest and its content hash.
    ``show_progress`` draws a line per stage, for a person at a terminal (not inside a scheduled
    job, whose output goes to a log).
    """
    check_name(name)
    if not sources:
        raise UserInputError("no sources given: pass files, folders, globs or builtin sources")
    if len(sources) > MAX_SOURCES:
        raise UserInputError(f"{len(sources)} sources in one ingest; at most {MAX_SOURCES} (pass folders or globs)")
    resolved = [spec if isinstance(spec, Source) else resolve_source(spec, data) for spec in sources]
    with _deterministic_ray_data(), _stages(show_progress) as stage:
        stage("cleaning")
        passed, source_stats, dropped, count = _clean(resolved, data, extend)
        read = sum(s["documents_read"] for s in source_stats)
        if count:
            stage("finding duplicates")
            partitions = max(1, count // ROWS_PER_PARTITION)
            doomed, twins = duplicates(passed, data.near_dup_threshold, data.minhash_num_perm, partitions)
            dropped.update(twins)
        if count == 0:  # duplicates leave at least the first of each
            reasons = ", ".join(f"{reason}: {n}" for reason, n in dropped.items() if n)
            raise UserInputError(
                f"nothing left after cleaning: all {read} documents were dropped ({reasons}); "
                "check the sources or loosen the data.* filters"
            )
        stage("sorting")
        kept = _sorted_kept(passed, doomed, partitions)
        digest, sides = _digest(kept, data, manifest_extra)

        versions = list_versions(datasets_dir, name)
        # Only the latest counts as "unchanged": re-ingesting what v1 held after a different v2
        # must make that content the latest again, so it becomes v3.
        if versions and versions[-1].manifest.get("content_hash") == digest:
            logger.info("sources unchanged since %s (content hash %s); no new version", versions[-1].spec, digest[:12])
            return IngestResult(version=versions[-1], created=False)
        if sides["validation"] == 0:
            logger.warning("dataset %s has no validation documents; add data or raise data.validation_fraction", name)
        version = versions[-1].version + 1 if versions else 1
        manifest = {
            "name": name,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sources": source_stats,
            "counts": {"read": read, "kept": sides["train"] + sides["validation"], **sides, "dropped": dropped},
            "content_hash": digest,
            "config": data.model_dump(mode="json"),
            **({"extends": extend.spec} if extend is not None else {}),
            **(manifest_extra or {}),
        }
        stage("writing")
        path = write_version(join(datasets_dir, name), version, _sides(kept, data), manifest)
    logger.info("wrote %s: %d documents kept of %d read", path, manifest["counts"]["kept"], read)
    return IngestResult(version=DatasetVersion(name=name, version=version, path=path, manifest=manifest), created=True)


@contextmanager
def _deterministic_ray_data() -> Iterator[None]:
    """Preserve row order (a source's cap takes its first documents) and silence Ray's own progress
    bars (ours names the stage), restoring the caller's settings afterwards."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


@contextmanager
def _stages(show: bool) -> Iterator[Any]:
    """A spinner naming the stage at work and the time spent, on stderr when ``show``."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not show) as progress:
        task = progress.add_task("starting", total=None)
        yield lambda description: progress.update(task, description=f"ingest: {description}")


def _clean_batch(batch: pa.Table, data: DataConfig, number: int, licence: str) -> pa.Table:
    """map_batches: raw documents of source ``number`` → cleaned text, drop reason, content hash,
    MinHash signature, and the document's ``order`` in the whole ingest.

    Dropped documents keep their row (to be counted per reason) but lose their text. Signatures are
    a fixed-size list (zeros when dropped) so a batch of them reads as one numpy array."""
    texts, reasons, hashes = [], [], []
    for raw in batch.column("text").to_pylist():
        text, reason = clean(raw, data) if raw is not None else (None, None)
        texts.append(None if reason else text)
        reasons.append(reason)
        hashes.append(content_hash(text) if text is not None and not reason else None)
    return _with_signatures(pa.table({
        "text": pa.array(texts, pa.string()),
        "source": batch.column("source"),
        "licence": pa.array([licence] * batch.num_rows, pa.string()),
        "content_hash": pa.array(hashes, pa.string()),
        "error": batch.column("error"),
        "drop_reason": pa.array(reasons, pa.string()),
        "order": pc.bit_wise_or(batch.column("order"), pa.scalar(number << SOURCE_SHIFT, pa.int64())),
    }), data)


def _extended_batch(batch: pa.Table, data: DataConfig) -> pa.Table:
    """map_batches: rows of the extended version, as cleaned rows that come before every source's.
    Their order is the content hash's first 52 bits: below every source's, unique within a version
    (a collision would only make two kept documents tie)."""
    batch = as_output(batch)
    hashes = batch.column("content_hash").to_pylist()
    return _with_signatures(pa.table({
        **{column: batch.column(column) for column in OUTPUT_SCHEMA.names},
        "error": pa.nulls(batch.num_rows, pa.string()),
        "drop_reason": pa.nulls(batch.num_rows, pa.string()),
        "order": pa.array([int(h[:13], 16) for h in hashes], pa.int64()),
    }), data)


def _with_signatures(table: pa.Table, data: DataConfig) -> pa.Table:
    signatures = np.zeros((table.num_rows, data.minhash_num_perm), dtype=np.uint32)
    texts = table.column("text").to_pylist()
    todo = [i for i, text in enumerate(texts) if text is not None]
    if todo:
        signatures[todo] = minhash_signatures([texts[i] for i in todo], data.minhash_num_perm, data.shingle_words)
    signature_type = pa.list_(pa.uint32(), data.minhash_num_perm)
    return table.append_column("signature", pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()),
                                                                              type=signature_type))


def _tally(batch: pa.Table) -> pa.Table:
    """map_batches: one row per (source number, drop reason) with its count and the first parse error."""
    sources = pc.shift_right(batch.column("order"), SOURCE_SHIFT)
    grouped = pa.table({"number": sources, "reason": batch.column("drop_reason"), "error": batch.column("error")})
    return grouped.group_by(["number", "reason"], use_threads=False).aggregate(
        [("number", "count"), ("error", "min")])


def _passed(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("drop_reason"))).drop_columns(["error", "drop_reason"])


def _clean(resolved: list[Source], data: DataConfig, extend: DatasetVersion | None
           ) -> tuple[ray.data.Dataset, list[dict[str, Any]], dict[str, int], int]:
    """The documents that pass the filters, materialized on the cluster, with the per-source counts,
    the counts per drop reason and how many passed. Raises the first parse error of the first source
    that has one, and names a source without documents."""
    parts = [source.read(data).map_batches(_clean_batch, fn_kwargs={"data": data, "number": number,
                                                                    "licence": source.licence},
                                           batch_format="pyarrow", batch_size=256)
             for number, source in enumerate(resolved, start=1)]
    if extend is not None:
        fs, _ = filesystem(extend.path)
        paths = [filesystem(p)[1] for p in (extend.train_path, extend.validation_path)]
        parts.insert(0, ray.data.read_parquet(paths, filesystem=fs).map_batches(
            _extended_batch, fn_kwargs={"data": data}, batch_format="pyarrow", batch_size=256))
    cleaned = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
    tallies = [t for t in ray.get(list(cleaned.map_batches(_tally, batch_format="pyarrow").materialize()
                                       .to_arrow_refs())) if t.num_rows]
    read: dict[int, int] = {}
    dropped = dict.fromkeys(DROP_REASONS, 0)
    errors: dict[int, str] = {}
    rows = (zip(*(t.column(c).to_pylist() for c in ("number", "reason", "number_count", "error_min")), strict=True)
            for t in tallies)
    for number, reason, n, error in (row for table in rows for row in table):
        read[number] = read.get(number, 0) + n
        if reason is not None:
            dropped[reason] += n
        if error is not None:
            errors[number] = min(error, errors.get(number, error))
    if errors:
        raise UserInputError(errors[min(errors)])
    stats = []
    for number, source in enumerate(resolved, start=1):
        if not read.get(number):
            raise UserInputError(f"source {source.spec!r} has no documents")
        stats.append({"source": source.spec, "licence": source.licence, "documents_read": read[number]})
    count = sum(read.values()) - sum(dropped.values())
    return cleaned.map_batches(_passed, batch_format="pyarrow").materialize(), stats, dropped, count


@ray.remote
def _sort_in_one_task(refs: list[ray.ObjectRef], dropped: list[ray.ObjectRef]) -> pa.Table:
    return drop_duplicates(pa.concat_tables(ray.get(refs)), dropped[0]).sort_by("content_hash")


def _sorted_kept(passed: ray.data.Dataset, dropped: ray.ObjectRef, partitions: int) -> ray.data.Dataset:
    """The documents not ``dropped``, as OUTPUT_SCHEMA sorted by content hash, materialized. One
    partition is sorted in one task: Ray Data's distributed sort costs seconds of fixed overhead."""
    passed = passed.select_columns(OUTPUT_SCHEMA.names + ["order"])
    if partitions == 1:
        table = _sort_in_one_task.remote(list(passed.to_arrow_refs()), [dropped])  # a list: passed as a reference
        return ray.data.from_arrow_refs([table]).select_columns(OUTPUT_SCHEMA.names).materialize()
    return (passed.map_batches(drop_duplicates, fn_kwargs={"dropped": dropped}, batch_format="pyarrow")
            .select_columns(OUTPUT_SCHEMA.names).sort("content_hash").materialize())


def _digest(kept: ray.data.Dataset, data: DataConfig, manifest_extra: dict[str, Any] | None
            ) -> tuple[str, dict[str, int]]:
    """The version's content hash (its documents' hashes and splits, in hash order, and the extra
    manifest fields) and the size of each split, read from the hash column one batch at a time."""
    digest = hashlib.sha256()
    sides = {"train": 0, "validation": 0}
    for batch in kept.iter_batches(batch_format="pyarrow", batch_size=65536):
        for doc_hash in batch.column("content_hash").to_pylist():
            side = split_of(doc_hash, data.validation_fraction)
            sides[side] += 1
            digest.update(f"{doc_hash} {side}\n".encode())
    if manifest_extra:
        digest.update(json.dumps(manifest_extra, sort_keys=True).encode())
    return digest.hexdigest(), sides


def _sides(kept: ray.data.Dataset, data: DataConfig) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(train rows, validation rows) of each batch of ``kept``, in its order."""
    for batch in kept.iter_batches(batch_format="pyarrow", batch_size=8192):
        is_train = pa.array([split_of(h, data.validation_fraction) == TRAIN
                             for h in batch.column("content_hash").to_pylist()])
        yield batch.filter(is_train), batch.filter(pc.invert(is_train))
