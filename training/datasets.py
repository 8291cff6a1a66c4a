"""The versioned dataset store, and ``ingest``, which turns sources into a new version of it.

Layout: ``datasets_dir/NAME/vN/`` holds ``train.parquet``, ``validation.parquet`` (columns
text, source, licence, content_hash; rows sorted by content_hash) and ``manifest.json``.
Versions are immutable and identified by a content hash, so a model can always be traced
to the exact text it saw, and re-ingesting unchanged sources does not create a new version.

The per-document work (parsing, normalising, filtering, hashing, MinHash signatures) runs in
Ray Data; deduplication runs on the driver while it streams the batches in a fixed order,
because it is the one step that must compare every document with all earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from genloop.training.cleaning import (
    DROP_REASONS,
    VALIDATION,
    DuplicateIndex,
    HeldOutPart,
    clean,
    content_hash,
    held_out_part,
    minhash_signatures,
    split_of,
)
from genloop.training.config import DataConfig
from genloop.training.errors import UserInputError, echo
from genloop.training.sources import Source, resolve_source

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
TRAIN_FILE = "train.parquet"
VALIDATION_FILE = "validation.parquet"
OUTPUT_SCHEMA = pa.schema(
    [("text", pa.string()), ("source", pa.string()), ("licence", pa.string()), ("content_hash", pa.string())]
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a folder name on every filesystem
_VERSION_DIR = re.compile(r"v([0-9]+)")
_VERSION_SPEC = re.compile(r"v?([0-9]+)")


@dataclass(frozen=True)
class DatasetVersion:
    """One immutable version of a dataset on disk."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any] = field(compare=False, repr=False)

    @property
    def train_path(self) -> Path:
        return self.path / TRAIN_FILE

    @property
    def validation_path(self) -> Path:
        return self.path / VALIDATION_FILE

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def texts(self, split: str = VALIDATION) -> list[str]:
        """The texts of one split ("train" or "validation")."""
        path = self.validation_path if split == VALIDATION else self.train_path
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()

    def held_out(self, part: HeldOutPart) -> list[str]:
        """The validation texts of one part (``cleaning.held_out_part``): "gate" or "selection"."""
        table = read_split(self.validation_path)
        return [text for text, doc_hash in zip(table.column("text").to_pylist(),
                                               table.column("content_hash").to_pylist(), strict=True)
                if held_out_part(doc_hash) == part]

    @property
    def spec(self) -> str:
        """``NAME:vN``, the form ``resolve_dataset`` accepts and model versions are tagged with."""
        return f"{self.name}:v{self.version}"


@dataclass(frozen=True)
class IngestResult:
    """The version an ingest produced; ``created`` is False when the input matched the latest version."""

    version: DatasetVersion
    created: bool


# --- the store --------------------------------------------------------------------------------


def list_datasets(datasets_dir: Path) -> list[str]:
    """Names of the datasets that have at least one version."""
    if not Path(datasets_dir).is_dir():
        return []
    return sorted(d.name for d in Path(datasets_dir).iterdir() if list_versions(datasets_dir, d.name))


def check_name(name: str) -> str:
    """``name`` when it can name a dataset (its folder), else the UserInputError that says why."""
    if not _NAME.fullmatch(name):
        raise UserInputError(f"invalid dataset name {echo(name)!r}: 1 to 100 letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit")
    return name


def list_versions(datasets_dir: Path, name: str) -> list[DatasetVersion]:
    """Versions of ``name``, oldest first; empty when the dataset does not exist.

    Only complete versions count: a folder is a version once it is renamed to ``vN``, and the
    rename happens after all its files are written (temporary folders start with a dot).
    """
    folder = Path(datasets_dir) / name
    if not _NAME.fullmatch(name) or not folder.is_dir():
        return []
    versions = []
    for entry in folder.iterdir():
        match = _VERSION_DIR.fullmatch(entry.name)
        if match and (entry / MANIFEST_FILE).is_file():
            try:
                manifest = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserInputError(f"{entry / MANIFEST_FILE}: unreadable manifest ({exc})") from None
            versions.append(DatasetVersion(name=name, version=int(match.group(1)), path=entry, manifest=manifest))
    return sorted(versions, key=lambda v: v.version)


def resolve_dataset(datasets_dir: Path, spec: str) -> DatasetVersion:
    """``NAME`` (latest version), ``NAME:vN`` or ``NAME:N`` → that version; UserInputError otherwise."""
    name, has_version, wanted = spec.partition(":")
    versions = list_versions(datasets_dir, check_name(name))
    if not versions:
        existing = ", ".join(list_datasets(datasets_dir)) or "none"
        raise UserInputError(f"no dataset named {name!r} in {datasets_dir} (existing datasets: {existing})")
    if not has_version:
        return versions[-1]
    match = _VERSION_SPEC.fullmatch(wanted)
    if match:
        for version in versions:
            if version.version == int(match.group(1)):
                return version
    existing = ", ".join(f"v{v.version}" for v in versions)
    raise UserInputError(f"dataset {name!r} has no version {echo(wanted)!r} (versions: {existing})")


def read_split(path: Path) -> pa.Table:
    """A split's rows as OUTPUT_SCHEMA; texts of a table written without content hashes are hashed
    here, so versions made by hand (or by older code) read like ingested ones."""
    table = pq.read_table(path)
    columns = {}
    for column in OUTPUT_SCHEMA:
        if column.name in table.column_names:
            columns[column.name] = table.column(column.name).cast(column.type)
        elif column.name == "content_hash":
            columns[column.name] = pa.array([content_hash(t) for t in table.column("text").to_pylist()], pa.string())
        else:
            columns[column.name] = pa.nulls(table.num_rows, column.type)
    return pa.table(columns, schema=OUTPUT_SCHEMA)


# --- ingest -----------------------------------------------------------------------------------


def ingest(sources: list[str | Source], name: str, data: DataConfig, datasets_dir: Path,
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

    datasets_dir = Path(datasets_dir)
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
    path = write_version(datasets_dir / name, version, train, validation, manifest)
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


def write_version(folder: Path, version: int, train: pa.Table, validation: pa.Table, manifest: dict) -> Path:
    """Write into a hidden temporary folder, then rename it to ``vN``: readers never see half a version."""
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}"
    target = folder / f"v{version}"
    try:
        tmp.mkdir()
        pq.write_table(train, tmp / TRAIN_FILE)
        pq.write_table(validation, tmp / VALIDATION_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # another ingest won the race for this number
            raise FileExistsError(f"{target} appeared while writing; ingest again")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_folder and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return target
