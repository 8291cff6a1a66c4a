"""The versioned dataset store: a folder on one box, an object-store prefix on a cluster.

Layout: ``ROOT/NAME/vN/`` holds ``train.parquet``, ``validation.parquet`` (columns text, source,
licence, content_hash; rows sorted by content_hash) and ``manifest.json``. ``ROOT`` is a local
folder or any URI pyarrow has a filesystem for (``s3://bucket/prefix``: endpoint and credentials
from the standard AWS variables; ``gs://``; a shared mount). Versions are immutable and identified
by a content hash, so a model can always be traced to the exact text it saw.

A version's location (``DatasetVersion.path``, ``train_path``) is a string that names the same
files on every node: the URI itself, or the folder's path where the store is local. Ray Data's
``read_parquet`` and pyarrow read either, on whichever node runs the read.

Writes are atomic for readers: only a ``vN`` whose manifest exists is a version. On a local
filesystem a version is written into a hidden folder renamed to ``vN`` whole (and a rename onto an
existing version fails, so two racing ingests cannot both take a number). Object stores have no
rename: the parts go under ``vN/`` and the manifest is written last, in one PUT; a failed write
removes its parts, and parts a killed process left without a manifest are overwritten by the next
version written under that number. Two ingests of one dataset at once are serialised by the
scheduler (one job at a time, one scheduler per job store), not by the store.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genloop.training.cleaning import VALIDATION, HeldOutPart, content_hash, held_out_part
from genloop.training.errors import UserInputError, echo
from genloop.training.storage import filesystem, join

MANIFEST_FILE = "manifest.json"
TRAIN_FILE = "train.parquet"
VALIDATION_FILE = "validation.parquet"
OUTPUT_SCHEMA = pa.schema(
    [("text", pa.string()), ("source", pa.string()), ("licence", pa.string()), ("content_hash", pa.string())]
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a folder name on every filesystem
_VERSION_DIR = re.compile(r"v([0-9]+)")
_VERSION_SPEC = re.compile(r"v?([0-9]+)")


def _is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


@dataclass(frozen=True)
class DatasetVersion:
    """One immutable version of a dataset in the store."""

    name: str
    version: int
    path: str  # a folder or URI: the same files from every node
    manifest: dict[str, Any] = field(compare=False, repr=False)

    @property
    def train_path(self) -> str:
        return join(self.path, TRAIN_FILE)

    @property
    def validation_path(self) -> str:
        return join(self.path, VALIDATION_FILE)

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def texts(self, split: str = VALIDATION) -> list[str]:
        """The texts of one split ("train" or "validation")."""
        path = self.validation_path if split == VALIDATION else self.train_path
        return read_split(path).column("text").to_pylist()

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


def _subfolders(fs: pafs.FileSystem, path: str) -> list[str]:
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [entry.base_name for entry in entries if entry.type == pafs.FileType.Directory]


def list_datasets(root: str | Path) -> list[str]:
    """Names of the datasets that have at least one version."""
    return sorted(name for name in _subfolders(*filesystem(root)) if list_versions(root, name))


def check_name(name: str) -> str:
    """``name`` when it can name a dataset (its folder), else the UserInputError that says why."""
    if not _NAME.fullmatch(name):
        raise UserInputError(f"invalid dataset name {echo(name)!r}: 1 to 100 letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit")
    return name


def list_versions(root: str | Path, name: str) -> list[DatasetVersion]:
    """Versions of ``name``, oldest first; empty when the dataset does not exist. Only committed
    versions count: a ``vN`` with its manifest (see the module's docstring)."""
    if not _NAME.fullmatch(name):
        return []
    fs, base = filesystem(root)
    versions = []
    for entry in _subfolders(fs, f"{base}/{name}"):
        match = _VERSION_DIR.fullmatch(entry)
        manifest_path = f"{base}/{name}/{entry}/{MANIFEST_FILE}"
        if match and _is_file(fs, manifest_path):
            location = join(root, name, entry)
            try:
                with fs.open_input_stream(manifest_path) as stream:
                    manifest = json.loads(stream.read().decode("utf-8"))
            except (OSError, ValueError) as exc:
                raise UserInputError(f"{join(location, MANIFEST_FILE)}: unreadable manifest ({exc})") from None
            versions.append(DatasetVersion(name=name, version=int(match.group(1)), path=location, manifest=manifest))
    return sorted(versions, key=lambda v: v.version)


def resolve_dataset(root: str | Path, spec: str) -> DatasetVersion:
    """``NAME`` (latest version), ``NAME:vN`` or ``NAME:N`` → that version; UserInputError otherwise."""
    name, has_version, wanted = spec.partition(":")
    versions = list_versions(root, check_name(name))
    if not versions:
        existing = ", ".join(list_datasets(root)) or "none"
        raise UserInputError(f"no dataset named {name!r} in {root} (existing datasets: {existing})")
    if not has_version:
        return versions[-1]
    match = _VERSION_SPEC.fullmatch(wanted)
    if match:
        for version in versions:
            if version.version == int(match.group(1)):
                return version
    existing = ", ".join(f"v{v.version}" for v in versions)
    raise UserInputError(f"dataset {name!r} has no version {echo(wanted)!r} (versions: {existing})")


def read_split(path: str | Path) -> pa.Table:
    """A split's rows as OUTPUT_SCHEMA; texts of a table written without content hashes are hashed
    here, so versions made by hand (or by older code) read like ingested ones."""
    fs, inner = filesystem(path)
    return as_output(pq.read_table(inner, filesystem=fs))


def as_output(table: pa.Table) -> pa.Table:
    """Rows of a split as OUTPUT_SCHEMA (see ``read_split``), for readers that read the files themselves."""
    columns = {}
    for column in OUTPUT_SCHEMA:
        if column.name in table.column_names:
            columns[column.name] = table.column(column.name).cast(column.type)
        elif column.name == "content_hash":
            columns[column.name] = pa.array([content_hash(t) for t in table.column("text").to_pylist()], pa.string())
        else:
            columns[column.name] = pa.nulls(table.num_rows, column.type)
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def write_version(folder: str | Path, version: int, parts: Iterable[tuple[pa.Table, pa.Table]],
                  manifest: dict) -> str:
    """Write version ``version`` of the dataset at ``folder`` (``ROOT/NAME``), atomically for readers
    (see the module's docstring); returns its location. ``parts`` are (train rows, validation rows)
    pairs, streamed into the two files in turn, so a version larger than memory can be written."""
    fs, base = filesystem(folder)
    target = join(folder, f"v{version}")
    local = isinstance(fs, pafs.LocalFileSystem)
    draft = f"{base}/.tmp-{uuid.uuid4().hex}" if local else f"{base}/v{version}"
    made_folder = fs.get_file_info(base).type == pafs.FileType.NotFound
    if not local and _is_file(fs, f"{draft}/{MANIFEST_FILE}"):
        raise FileExistsError(f"{target} appeared while writing; ingest again")
    try:
        if local:  # an object store has no folders to make (pyarrow would write empty marker objects)
            fs.create_dir(draft, recursive=True)
        with (pq.ParquetWriter(f"{draft}/{TRAIN_FILE}", OUTPUT_SCHEMA, filesystem=fs) as train,
              pq.ParquetWriter(f"{draft}/{VALIDATION_FILE}", OUTPUT_SCHEMA, filesystem=fs) as validation):
            for train_rows, validation_rows in parts:
                train.write_table(as_output(train_rows))
                validation.write_table(as_output(validation_rows))
        with fs.open_output_stream(f"{draft}/{MANIFEST_FILE}") as stream:  # last: it commits the version
            stream.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        if local:
            if fs.get_file_info(f"{base}/v{version}").type != pafs.FileType.NotFound:
                raise FileExistsError(f"{target} appeared while writing; ingest again")  # another ingest won
            Path(draft).rename(f"{base}/v{version}")
    except BaseException:
        if fs.get_file_info(draft).type == pafs.FileType.Directory:
            fs.delete_dir(draft)
        if local and made_folder and not any(Path(base).iterdir()):
            Path(base).rmdir()
        raise
    return target
