"""The data watch: files that land in a folder become a new version of a dataset, each file once.

A file is identified by the sha256 of its bytes, recorded in the manifest of the version that
ingested it (``files``), so a file copied in twice, renamed, or left in place across restarts is
never ingested again, and the record lives with the data rather than in a database beside it.

A file still being written must never be read. Of the two usual signals, a ``.done`` marker
needs every producer to write one; a settle time works with any producer (cp, scp, rsync, an
object-store sync), so genloop uses that: a file is read once it has not been modified for
``settle_s`` seconds, and it is skipped if its size or modification time changed while it was
read. A writer that stalls longer than ``settle_s`` mid-file defeats it; write to a hidden name
(".x.jsonl", skipped here) and rename, which is atomic, to be safe at any speed.

The driver reads the bytes (which it must, to hash them) and hands them to Ray Data as data, not
as local paths, so the watch works the same when the workers are on other machines.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from genloop.training.config import DataConfig
from genloop.training.dataset_store import list_versions
from genloop.training.datasets import IngestResult, ingest
from genloop.training.errors import UserInputError
from genloop.training.sources import SUPPORTED_EXTENSIONS, Source


@dataclass(frozen=True)
class LandedFile:
    path: Path
    sha256: str
    data: bytes


def ingested_hashes(datasets_dir: str | Path, name: str) -> set[str]:
    """sha256 of every file the versions of ``name`` ingested from a watched folder."""
    return {entry["sha256"] for version in list_versions(datasets_dir, name)
            for entry in version.manifest.get("files", [])}


def landed_files(folder: Path, settle_s: float, known: set[str]) -> list[LandedFile]:
    """Settled, non-empty, supported files under ``folder`` (sorted, hidden ones skipped) whose bytes
    are not in ``known`` and not repeated earlier in the list."""
    if not folder.is_dir():
        raise UserInputError(f"scheduler.incoming {folder} is not a folder")
    landed: list[LandedFile] = []
    seen = set(known)
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in parts) or path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            continue
        before = path.stat()
        if not path.is_file() or before.st_size == 0 or time.time() - before.st_mtime < settle_s:
            continue
        data = path.read_bytes()
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(data) != after.st_size:
            continue  # written to while we read it: next time
        digest = hashlib.sha256(data).hexdigest()
        if digest not in seen:
            seen.add(digest)
            landed.append(LandedFile(path=path, sha256=digest, data=data))
    return landed


def ingest_incoming(folder: Path, name: str, data: DataConfig, datasets_dir: str | Path,
                    settle_s: float) -> IngestResult | None:
    """Ingest the files newly landed in ``folder`` into a new version of ``name`` that keeps the
    latest version's documents; None when no new file has settled."""
    folder = Path(folder)
    landed = landed_files(folder, settle_s, ingested_hashes(datasets_dir, name))
    if not landed:
        return None
    versions = list_versions(datasets_dir, name)
    previous = versions[-1] if versions else None
    source = Source(spec=f"incoming:{folder}", licence=data.licence, files=tuple(str(f.path) for f in landed),
                    payload=tuple(f.data for f in landed))
    files = (previous.manifest.get("files", []) if previous else []) + [
        {"path": str(f.path.relative_to(folder)), "sha256": f.sha256, "bytes": len(f.data)} for f in landed]
    return ingest([source], name, data, datasets_dir, extend=previous, manifest_extra={"files": files})
