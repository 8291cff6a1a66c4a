"""Source readers: turn a source spec (file, folder, glob or builtin) into a Ray Dataset of documents.

The driver validates a spec before any Ray work (existence, extension, empty files), so the
common mistakes fail fast with a message naming the path. Problems only visible in the
content (bad UTF-8, a missing text field) are found by the workers; they travel back as an
``error`` column rather than as exceptions, because Ray reports a worker's exception as an
opaque ``RayTaskError`` and the user would lose the file name and line.

Every file goes through ``read_binary_files`` and one parsing function dispatching on the
extension: one reader keeps the rows in sorted path order across formats (the order that
``max_documents_per_source`` and "first seen is kept" rely on), and bytes decode in workers.
"""

from __future__ import annotations

import ast
import csv
import glob
import io
import json
import logging
import os
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from genloop.training.config import DataConfig
from genloop.training.errors import UserInputError

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".csv", ".json", ".jsonl", ".parquet", ".txt")
PYTHON_DOCS = "builtin:python-docs"
PYTHON_CODE = "builtin:python-code"
BUILTIN_SOURCES = (PYTHON_CODE, PYTHON_DOCS)
BUILTIN_LICENCE = "PSF-2.0"

#: Rows every reader yields: the raw text, where it came from, a problem found while parsing, and its
#: place in the source (``place``), which decides which of two duplicates is "first seen".
DOCUMENT_SCHEMA = pa.schema(
    [("text", pa.string()), ("source", pa.string()), ("error", pa.string()), ("order", pa.int64())]
)
#: ``order`` is file (or builtin reference) number << PLACE_BITS | document number within it.
PLACE_BITS = 28
MAX_PLACES = 1 << PLACE_BITS

# Folders of the standard library that are tests or third-party packages, not the library itself.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """A validated source spec: the files (absolute, sorted) or the builtin it stands for."""

    spec: str
    licence: str
    files: tuple[str, ...] = ()
    builtin: str | None = None
    payload: tuple[bytes, ...] = field(default=(), repr=False)  # the files' bytes, when the driver read them


    def read(self, data: DataConfig) -> ray.data.Dataset:
        """Rows of ``DOCUMENT_SCHEMA`` in a fixed order, capped at ``data.max_documents_per_source``.

        The cap takes the first documents only with ``DataContext.execution_options.preserve_order``,
        which ``datasets.ingest`` sets; ``order`` says each row's place whatever the execution order.
        """
        if self.builtin is not None:
            refs = _builtin_refs(self.builtin)
            ds = ray.data.from_items([{"ref": ref, "item": i} for i, ref in enumerate(refs)]).map_batches(
                _builtin_documents, fn_kwargs={"builtin": self.builtin}, batch_format="pyarrow", batch_size=16
            )
        else:
            files = (ray.data.from_arrow(pa.table({"bytes": list(self.payload), "path": list(self.files)}))
                     if self.payload else ray.data.read_binary_files(list(self.files), include_paths=True))
            ds = files.map_batches(
                _file_documents,
                fn_kwargs={"txt_mode": data.txt_mode, "text_field": data.text_field,
                           "items": {path: i for i, path in enumerate(self.files)}},
                batch_format="pyarrow",
                batch_size=1,
            )
        if data.max_documents_per_source is not None:
            ds = ds.limit(data.max_documents_per_source)
        return ds


def resolve_source(spec: str, data: DataConfig) -> Source:
    """Check a source spec on the driver and list its files; raise UserInputError naming the problem."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_SOURCES:
            raise UserInputError(f"unknown builtin source {spec!r}; available: {', '.join(BUILTIN_SOURCES)}")
        return Source(spec=spec, licence=BUILTIN_LICENCE, builtin=spec)
    path = Path(spec).expanduser()
    if _GLOB_CHARS.search(spec):
        files = _glob_files(spec)
    elif path.is_dir():
        files = _folder_files(path, what=f"folder {spec!r}")
    elif path.is_file():
        files = [_checked_file(path)]
    elif path.exists():
        raise UserInputError(f"source {spec!r} is neither a regular file nor a folder")
    else:
        raise UserInputError(
            f"source {spec!r} does not exist (expected a file, a folder, a glob, or one of "
            f"{', '.join(BUILTIN_SOURCES)})"
        )
    if len(files) >= MAX_PLACES:
        raise UserInputError(f"source {spec!r} has {len(files)} files; split it into sources of fewer "
                             f"than {MAX_PLACES}")
    return Source(spec=spec, licence=data.licence, files=tuple(sorted(str(f.resolve()) for f in files)))


# --- driver side: finding files ---------------------------------------------------------------


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_EXTENSIONS


def _checked_file(path: Path) -> Path:
    """A file named explicitly must be usable: a supported, readable, non-empty file."""
    if not _supported(path):
        raise UserInputError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: file is not readable (check its permissions)")
    if path.stat().st_size == 0:
        raise UserInputError(f"{path}: file is empty")
    return path


def _usable_files(candidates: list[Path], what: str) -> list[Path]:
    """Files of a folder or glob: unsupported types are skipped, empty files skipped with a warning."""
    files = []
    for path in sorted(candidates, key=str):
        if not _supported(path):
            logger.debug("skipping %s: unsupported file type", path)
            continue
        if not os.access(path, os.R_OK):
            raise UserInputError(f"{path}: file is not readable (check its permissions)")
        if path.stat().st_size == 0:
            logger.warning("skipping %s: file is empty", path)
            continue
        files.append(path)
    if not files:
        raise UserInputError(
            f"{what} has no readable files (non-empty {', '.join(SUPPORTED_EXTENSIONS)}, hidden files ignored)"
        )
    return files


def _walk(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return found


def _folder_files(folder: Path, what: str) -> list[Path]:
    return _usable_files(_walk(folder), what)


def _glob_files(pattern: str) -> list[Path]:
    matches = [Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True)]
    if not matches:
        raise UserInputError(f"glob {pattern!r} matches nothing")
    candidates = []
    for match in matches:
        candidates += _walk(match) if match.is_dir() else [match] if match.is_file() else []
    return _usable_files(candidates, f"glob {pattern!r}")


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[str]:
    """The standard library's .py files relative to its root, sorted; tests and site-packages skipped."""
    root = _stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return sorted(found)


def _builtin_refs(builtin: str) -> list[str]:
    """What the workers should read: pydoc topics (by name) and stdlib files (relative paths)."""
    if builtin == PYTHON_CODE:
        return _stdlib_files()
    from pydoc_data.topics import topics

    return [f"topics/{name}" for name in sorted(topics)] + _stdlib_files()


# --- worker side: parsing ---------------------------------------------------------------------


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserInputError(
            f"{path}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); convert it to UTF-8"
        ) from None


def _text_of(record: object, text_field: str, path: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserInputError(f"{path}: {where} has no text field {text_field!r} (a string); set data.text_field")
    return record[text_field]


def _txt(raw: bytes, path: str, txt_mode: str, text_field: str) -> list[str]:
    text = _decode(raw, path).replace("\r\n", "\n").replace("\r", "\n")
    parts = _PARAGRAPH_BREAK.split(text) if txt_mode == "paragraph" else [text]
    return [p for p in parts if p.strip()]


def _jsonl(raw: bytes, path: str, txt_mode: str, text_field: str) -> list[str]:
    docs = []
    for number, line in enumerate(_decode(raw, path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        docs.append(_text_of(record, text_field, path, f"line {number}"))
    return docs


def _json(raw: bytes, path: str, txt_mode: str, text_field: str) -> list[str]:
    """A JSON array of records or one record; many ".json" files are really JSON Lines, so fall back."""
    text = _decode(raw, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return _jsonl(raw, path, txt_mode, text_field)
    records = value if isinstance(value, list) else [value]
    return [_text_of(r, text_field, path, f"record {i}") for i, r in enumerate(records, start=1)]


def _csv(raw: bytes, path: str, txt_mode: str, text_field: str) -> list[str]:
    csv.field_size_limit(2**31 - 1)  # documents are longer than the 128 KiB default allows
    reader = csv.DictReader(io.StringIO(_decode(raw, path), newline=""))
    try:
        if text_field not in (reader.fieldnames or []):
            raise UserInputError(
                f"{path}: no column {text_field!r} in the header (columns: {', '.join(reader.fieldnames or [])}); "
                "set data.text_field"
            )
        return [row[text_field] or "" for row in reader]
    except csv.Error as exc:
        raise UserInputError(f"{path}: not valid CSV near line {reader.line_num} ({exc})") from None


def _parquet(raw: bytes, path: str, txt_mode: str, text_field: str) -> list[str]:
    try:
        file = pq.ParquetFile(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as exc:
        raise UserInputError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = file.schema_arrow
    kind = schema.field(text_field).type if text_field in schema.names else None
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserInputError(
            f"{path}: no string column {text_field!r} (columns: {', '.join(schema.names)}); set data.text_field"
        )
    values = file.read(columns=[text_field]).column(text_field).to_pylist()
    if None in values:
        raise UserInputError(f"{path}: row {values.index(None) + 1} has a null {text_field!r}")
    return values


_PARSERS: dict[str, Callable[[bytes, str, str, str], list[str]]] = {
    ".txt": _txt,
    ".jsonl": _jsonl,
    ".json": _json,
    ".csv": _csv,
    ".parquet": _parquet,
}


def _places(item: int, count: int) -> list[int]:
    return [(item << PLACE_BITS) | n for n in range(count)]


def _file_documents(batch: pa.Table, txt_mode: str, text_field: str, items: dict[str, int]) -> pa.Table:
    """map_batches: (bytes, path) rows → document rows; a bad file becomes one ``error`` row.
    ``items`` numbers the source's files in their sorted order."""
    texts: list[str | None] = []
    sources: list[str] = []
    errors: list[str | None] = []
    places: list[int] = []
    for raw, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True):
        docs: Sequence[str | None]
        error: str | None = None
        try:
            docs = _PARSERS[Path(path).suffix.lower()](raw, path, txt_mode, text_field)
            if len(docs) >= MAX_PLACES:
                raise UserInputError(f"{path}: {len(docs)} documents in one file; split it below {MAX_PLACES}")
        except UserInputError as exc:
            docs, error = [None], str(exc)
        texts += docs
        sources += [path] * len(docs)
        errors += [error] * len(docs)
        places += _places(items[path], len(docs))
    return pa.table({"text": texts, "source": sources, "error": errors, "order": places}, schema=DOCUMENT_SCHEMA)


def _docstrings(source: str) -> list[str]:
    """Docstrings of a module and its classes and functions, found without importing anything."""
    tree = ast.parse(source)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, kinds))
    return [doc for doc in docs if doc and doc.strip()]


def _builtin_documents(batch: pa.Table, builtin: str) -> pa.Table:
    """map_batches: stdlib references → documents. Files that fail to decode or parse are skipped:
    they are Python's own test fixtures, not a user's mistake."""
    root = _stdlib_root()
    texts, sources, places = [], [], []
    for ref, item in zip(batch.column("ref").to_pylist(), batch.column("item").to_pylist(), strict=True):
        if ref.startswith("topics/"):
            from pydoc_data.topics import topics

            docs = [topics[ref.removeprefix("topics/")]]
        else:
            try:
                code = (root / ref).read_text(encoding="utf-8")
                docs = [code] if builtin == PYTHON_CODE else _docstrings(code)
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
                logger.debug("skipping %s: %s", ref, exc)
                continue
        docs = [d for d in docs if d.strip()]
        texts += docs
        sources += [f"{builtin}/{ref}"] * len(docs)
        places += _places(item, len(docs))
    return pa.table({"text": texts, "source": sources, "error": [None] * len(texts), "order": places},
                    schema=DOCUMENT_SCHEMA)
