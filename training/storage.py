"""Locations that name the same files from every node: a local folder, or a URI of any filesystem
pyarrow has (``s3://bucket/prefix`` with the standard AWS variables, ``gs://``, ``hdfs://``).

genloop hands Ray, its replicas and its jobs such a location as a plain string, never a ``Path``
on the machine that started them; each reader or writer opens it with ``filesystem`` where it runs.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a folder or URI, and the path within it."""
    text = str(location)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def is_local(location: str | Path) -> bool:
    return isinstance(filesystem(location)[0], pafs.LocalFileSystem)


def join(location: str | Path, *parts: str) -> str:
    """``location`` (a folder or URI) and ``parts``, as one location of the same kind."""
    return "/".join([str(location).rstrip("/"), *parts])
