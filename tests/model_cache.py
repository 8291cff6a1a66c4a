"""Trained test models, each trained once and kept on disk under a key of everything that makes it.

Training is most of what a test suite of a training service costs. A test that needs a model asks
for one by what it must be (data, steps, seed, base model, ...); the first ask trains it, every later
ask (in this session, in the other xdist worker, or in a later session on the same machine) loads the
same folder. The key hashes the arguments, the training texts, the tokenizer's vocabulary, the code
that trains (the trainer's own source and genloop's model and tokenizer modules) and the library
versions, so a change to any of them trains anew instead of testing a stale model.

Models are shared read-only: a test that must damage one (a corrupt weights file) damages the copy
the registry made of it. A manifest of file hashes is checked on every load, so a test that writes
into a shared model fails loudly instead of poisoning the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _digest(*parts: str | bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part if isinstance(part, bytes) else part.encode())
        sha.update(b"\0")
    return sha.hexdigest()


def _files_hash(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def code_fingerprint(*functions: Callable[..., Any]) -> str:
    """The source of the given functions and of genloop's training modules, with torch's and
    transformers' versions: what decides the weights besides the arguments."""
    import importlib.metadata

    from genloop.training import loop, models, tokenizer

    sources = [inspect.getsource(f) for f in functions]
    sources += [Path(module.__file__).read_text() for module in (models, tokenizer, loop)]
    versions = [importlib.metadata.version(name) for name in ("torch", "transformers", "tokenizers")]
    return _digest(*sources, *versions)


def texts_fingerprint(texts: list[str]) -> str:
    return _digest(*texts)


class ModelCache:
    """Model folders under ``root``, one per key; ``get(key, build)`` returns the folder, building it
    into a temporary folder first and renaming it into place, under a lock that the other test
    processes wait on."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = _digest(json.dumps(key, sort_keys=True))[:24]
        folder, manifest = self.root / name, self.root / f"{name}.json"
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not manifest.exists():  # written last: a folder without one is a build that died
                shutil.rmtree(folder, ignore_errors=True)
                work = self.root / f"{name}.tmp-{os.getpid()}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                build(work)
                os.replace(work, folder)
                manifest.write_text(json.dumps({"key": key, "files": _files_hash(folder)}, indent=1))
        recorded = json.loads(manifest.read_text())["files"]
        if _files_hash(folder) != recorded:
            raise AssertionError(f"the shared test model {folder} was modified by a test; models from the "
                                 "cache are read-only (copy one before changing it), and this one must be deleted")
        return folder
