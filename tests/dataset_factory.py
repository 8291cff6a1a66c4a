"""Dataset versions written straight to a datasets folder, for tests of what reads them (no ingest, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from genloop.training.cleaning import content_hash
from genloop.training.dataset_store import OUTPUT_SCHEMA, DatasetVersion, write_version


def write_dataset(root: Path, name: str, number: int, train: list[str], validation: list[str]) -> DatasetVersion:
    """Version ``number`` of dataset ``name`` under ``root`` with these splits, as ingest lays it out."""
    def table(texts: list[str]) -> pa.Table:
        return pa.table({"text": texts, "source": ["s"] * len(texts), "licence": ["l"] * len(texts),
                         "content_hash": [content_hash(t) for t in texts]}, schema=OUTPUT_SCHEMA)

    manifest = {"name": name, "version": number, "content_hash": f"{name}{number}"}
    path = write_version(Path(root) / name, number, [(table(train), table(validation))], manifest)
    return DatasetVersion(name=name, version=number, path=path, manifest=manifest)
