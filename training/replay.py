"""Training mixes for warm starts: the documents a model has not seen, plus a replay of those it has.

A model warm-started on a new domain alone forgets the old one, and the gate rightly refuses it.
Replaying a share of the earlier training data is the standard remedy in continual pre-training,
and the cheapest: no extra loss term, no second model, only data. ``build_mix`` writes the mix as a
version of its own dataset (``<name>-mix``), so the trained-on text stays traceable like any other
version, and its manifest says which version it was drawn from and which versions it replays.

The split of every document is fixed by its content hash (``training.cleaning.split_of``), so replay
draws from train splits only and the mix's validation split is the fresh version's: no model is ever
validated on text it trained on. The mix is built with pyarrow on the driver: it moves rows that are
already clean, and it hands no new path to Ray.
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from genloop.training.dataset_store import DatasetVersion, list_versions, read_split, write_version
from genloop.training.storage import join

MIX_SUFFIX = "-mix"


def seen_hashes(versions: list[DatasetVersion]) -> set[str]:
    """Content hashes of every document (both splits) of ``versions``."""
    hashes: set[str] = set()
    for version in versions:
        for path in (version.train_path, version.validation_path):
            hashes.update(read_split(path).column("content_hash").to_pylist())
    return hashes


def new_documents(fresh: DatasetVersion, seen: list[DatasetVersion]) -> int:
    """Train documents of ``fresh`` that none of ``seen`` holds."""
    known = seen_hashes(seen)
    return sum(h not in known for h in read_split(fresh.train_path).column("content_hash").to_pylist())


def build_mix(datasets_dir: str | Path, fresh: DatasetVersion, seen: list[DatasetVersion], fraction: float,
              seed: int = 0) -> DatasetVersion | None:
    """The train documents of ``fresh`` absent from ``seen``, plus a seeded sample of ``seen``'s train
    splits making up ``fraction`` of the result's text (less when there is not that much); the
    validation split is ``fresh``'s. None when ``fresh`` holds nothing new. Writing the same mix twice
    gives the existing version back.

    The share is of characters, not documents: what a step trains on is tokens, and domains differ
    in document length (a source file is ten docstrings long), so a share of documents would replay
    far less of a short-document domain than it says."""
    known = seen_hashes(seen)
    train = read_split(fresh.train_path)
    new = train.filter(pc.invert(pc.is_in(train.column("content_hash"), pa.array(sorted(known), pa.string()))))
    if new.num_rows == 0:
        return None
    pool = pa.concat_tables([read_split(v.train_path) for v in seen]) if seen else train.slice(0, 0)
    unique = {h: i for i, h in enumerate(pool.column("content_hash").to_pylist())}  # last copy of each
    fresh_hashes = set(new.column("content_hash").to_pylist())
    candidates = sorted(i for h, i in unique.items() if h not in fresh_hashes)
    random.Random(seed).shuffle(candidates)
    sizes = pc.utf8_length(pool.column("text")).to_pylist()
    wanted = fraction / (1 - fraction) * sum(pc.utf8_length(new.column("text")).to_pylist())
    picked, replayed = [], 0
    for index in candidates:
        if replayed >= wanted:
            break
        picked.append(index)
        replayed += sizes[index]
    picked.sort()
    replay = pool.take(pa.array(picked, pa.int64()))
    mixed = pa.concat_tables([new, replay]).sort_by("content_hash")
    validation = read_split(fresh.validation_path)
    digest = hashlib.sha256("".join(f"{h} train\n" for h in mixed.column("content_hash").to_pylist()).encode()
                            + "".join(f"{h} validation\n" for h in validation.column("content_hash").to_pylist())
                            .encode()).hexdigest()

    name = fresh.name + MIX_SUFFIX
    versions = list_versions(datasets_dir, name)
    for version in reversed(versions):
        if version.manifest.get("content_hash") == digest:
            return version
    number = versions[-1].version + 1 if versions else 1
    manifest = {
        "name": name,
        "version": number,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "kind": "mix",
        "base": fresh.spec,
        "replay": {"fraction": fraction, "versions": [v.spec for v in seen], "documents": replay.num_rows,
                   "characters": replayed, "seed": seed},
        "counts": {"new": new.num_rows, "replay": replay.num_rows, "train": mixed.num_rows,
                   "validation": validation.num_rows, "kept": mixed.num_rows + validation.num_rows},
        "content_hash": digest,
    }
    path = write_version(join(datasets_dir, name), number, [(mixed, validation)], manifest)
    return DatasetVersion(name=name, version=number, path=path, manifest=manifest)
