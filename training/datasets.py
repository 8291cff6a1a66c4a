"""``ingest``: sources in, a new version of a dataset out (the store is ``training.dataset_store``).

Re-ingesting unchanged sources does not create a new version: a version is identified by the
content hash of its documents and their splits.

The per-document work (parsing, normalising, filtering, hashing, MinHash signatures) runs in
Ray Data; deduplication runs on the driver while it streams the batches in a fixed order,
because it is the one step that must compare every document with all earlier ones.
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
    VALIDATION,
    DuplicateIndex,
    clean,
    content_hash,
    minhash_signatures,
    split_of,
)
from genloop.training.config import DataConfig
from genloop.training.dataset_store import (
    OUTPUT_SCHEMA,
    DatasetVersion,
    check_name,
    list_versions,
    read_split,
    write_version,
)
from genloop.training.errors import UserInputError
from genloop.training.sources import Source, resolve_source
from genloop.training.storage import join

logger = logging.getLogger(__name__)


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
    succeeded; the version folder appears with one rename, so a failure leaves no trace.
    ``extend`` keeps that version's documents as they are, first, and adds the sources' to them
    (deduplicated against them). ``manifest_extra`` goes into the manifest and its content hash.
    ``show_progress`` draws a progress line per source, for a person at a terminal (not inside a
    scheduled job, whose output goes to a log).
    """
    check_name(name)
    if not sources:
        raise UserInputError("no sources given: pass files, folders, globs or builtin sources")
    resolved = [spec if isinstance(spec, Source) else resolve_source(spec, data) for spec in sources]
    table, source_stats, dropped = _read_and_clean(resolved, data, extend, show_progress)
    read = sum(s["documents_read"] for s in source_stats)
    if table.num_rows == 0:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in dropped.items() if n)
        raise UserInputError(
            f"nothing left after cleaning: all {read} documents were dropped ({reasons}); "
            "check the sources or loosen the data.* filters"
        )

    table = table.sort_by("content_hash")
    hashes = table.column("content_hash").to_pylist()
    splits = [split_of(h, data.validation_fraction) for h in hashes]
    digest = hashlib.sha256("".join(f"{h} {s}\n" for h, s in zip(hashes, splits, strict=True)).encode()
                            + (json.dumps(manifest_extra, sort_keys=True).encode() if manifest_extra else b"")
                            ).hexdigest()

    versions = list_versions(datasets_dir, name)
    # Only the latest counts as "unchanged": re-ingesting what v1 held after a different v2
    # must make that content the latest again, so it becomes v3.
    if versions and versions[-1].manifest.get("content_hash") == digest:
        logger.info("sources unchanged since %s (content hash %s); no new version", versions[-1].spec, digest[:12])
        return IngestResult(version=versions[-1], created=False)

    is_validation = pa.array([s == VALIDATION for s in splits])
    train, validation = table.filter(pc.invert(is_validation)), table.filter(is_validation)
    if validation.num_rows == 0:
        logger.warning("dataset %s has no validation documents; add data or raise data.validation_fraction", name)
    version = versions[-1].version + 1 if versions else 1
    manifest = {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sources": source_stats,
        "counts": {
            "read": read,
            "kept": table.num_rows,
            "train": train.num_rows,
            "validation": validation.num_rows,
            "dropped": dropped,
        },
        "content_hash": digest,
        "config": data.model_dump(mode="json"),
        **({"extends": extend.spec} if extend is not None else {}),
        **(manifest_extra or {}),
    }
    path = write_version(join(datasets_dir, name), version, train, validation, manifest)
    logger.info("wrote %s: %d documents kept of %d read", path, table.num_rows, read)
    return IngestResult(version=DatasetVersion(name=name, version=version, path=path, manifest=manifest), created=True)


@contextmanager
def _deterministic_ray_data() -> Iterator[None]:
    """Preserve row order (reproducible "first seen is kept") and silence Ray's own progress bars
    (ours shows the same progress), restoring the caller's settings afterwards."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _clean_batch(batch: pa.Table, data: DataConfig) -> pa.Table:
    """map_batches: raw documents → cleaned text, drop reason, content hash, MinHash signature.

    Dropped documents keep their row (so the driver can count them per reason) but lose their
    text, which spares the transfer. Signatures are a fixed-size list (zeros when dropped) so
    the driver can read a whole batch of them as one numpy array.
    """
    texts, reasons, hashes = [], [], []
    for raw in batch.column("text").to_pylist():
        text, reason = clean(raw, data) if raw is not None else (None, None)
        texts.append(None if reason else text)
        reasons.append(reason)
        hashes.append(content_hash(text) if text is not None and not reason else None)
    signatures = np.zeros((len(texts), data.minhash_num_perm), dtype=np.uint32)
    todo = [i for i, h in enumerate(hashes) if h is not None]
    if todo:
        signatures[todo] = minhash_signatures([texts[i] for i in todo], data.minhash_num_perm, data.shingle_words)
    signature_type = pa.list_(pa.uint32(), data.minhash_num_perm)
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "source": batch.column("source"),
            "error": batch.column("error"),
            "drop_reason": pa.array(reasons, pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()), type=signature_type),
        }
    )


def _read_and_clean(
    resolved: list[Source], data: DataConfig, extend: DatasetVersion | None, show_progress: bool
) -> tuple[pa.Table, list[dict[str, Any]], dict[str, int]]:
    """Run each source through Ray Data and deduplicate on the driver, source by source, in order,
    after the documents of ``extend`` (kept as they are; their signatures are recomputed here)."""
    index = DuplicateIndex(data.near_dup_threshold, data.minhash_num_perm)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept: dict[str, list[str]] = {column: [] for column in OUTPUT_SCHEMA.names}
    if extend is not None:
        earlier = pa.concat_tables([read_split(path) for path in (extend.train_path, extend.validation_path)])
        texts = earlier.column("text").to_pylist()
        signatures = minhash_signatures(texts, data.minhash_num_perm, data.shingle_words) if texts else []
        for doc_hash, signature in zip(earlier.column("content_hash").to_pylist(), signatures, strict=True):
            index.add(doc_hash, signature)
        for column in OUTPUT_SCHEMA.names:
            kept[column].extend(earlier.column(column).to_pylist())
    source_stats = []
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed} read, {task.fields[kept]} kept"),
        TimeElapsedColumn(),
    )
    with _deterministic_ray_data(), Progress(*columns, console=Console(stderr=True),
                                             disable=not show_progress) as progress:
        for source in resolved:
            task = progress.add_task(f"ingesting {source.spec}", total=None, kept=0)
            ds = source.read(data).map_batches(
                _clean_batch, fn_kwargs={"data": data}, batch_format="pyarrow", batch_size=256
            )
            read, kept_before = 0, len(kept["text"])
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                errors = batch.column("error").drop_null()
                if len(errors):
                    raise UserInputError(errors[0].as_py())
                signatures = batch.column("signature").combine_chunks().flatten().to_numpy()
                signatures = signatures.reshape(batch.num_rows, data.minhash_num_perm)
                rows = zip(
                    batch.column("text").to_pylist(),
                    batch.column("source").to_pylist(),
                    batch.column("drop_reason").to_pylist(),
                    batch.column("content_hash").to_pylist(),
                    signatures,
                    strict=True,
                )
                for text, origin, reason, doc_hash, signature in rows:
                    reason = reason or index.add(doc_hash, signature)
                    if reason:
                        dropped[reason] += 1
                        continue
                    kept["text"].append(text)
                    kept["source"].append(origin)
                    kept["licence"].append(source.licence)
                    kept["content_hash"].append(doc_hash)
                read += batch.num_rows
                progress.update(task, advance=batch.num_rows, kept=len(kept["text"]) - kept_before)
            if read == 0:
                raise UserInputError(f"source {source.spec!r} has no documents")
            source_stats.append({"source": source.spec, "licence": source.licence, "documents_read": read})
    return pa.table(kept, schema=OUTPUT_SCHEMA), source_stats, dropped
