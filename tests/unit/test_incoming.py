"""The data watch's file rules: settled files only, each content once, hidden files never."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from genloop.training.errors import UserInputError
from genloop.training.incoming import landed_files


def settled(path, text: str):
    path.write_text(text, encoding="utf-8")
    past = time.time() - 120
    os.utime(path, (past, past))
    return path


def test_only_settled_new_content_is_read(tmp_path):
    done = settled(tmp_path / "a.jsonl", '{"text": "complete"}\n')
    settled(tmp_path / "copy-of-a.jsonl", '{"text": "complete"}\n')  # the same bytes again
    (tmp_path / "b.jsonl").write_text('{"text": "still being writ', encoding="utf-8")  # modified just now
    settled(tmp_path / ".c.jsonl", '{"text": "hidden: a producer writes here, then renames"}\n')
    settled(tmp_path / "notes.md", "not a data file")
    (tmp_path / "sub").mkdir()
    nested = settled(tmp_path / "sub" / "d.txt", "a nested text file")

    landed = landed_files(tmp_path, settle_s=30, known=set())
    assert [f.path for f in landed] == [done, nested]
    assert landed[0].sha256 == hashlib.sha256(done.read_bytes()).hexdigest() and landed[0].data == done.read_bytes()

    assert [f.path for f in landed_files(tmp_path, settle_s=30, known={landed[0].sha256})] == [nested]
    assert len(landed_files(tmp_path, settle_s=0, known=set())) == 3  # b counts once it has settled


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="not a folder"):
        landed_files(tmp_path / "nowhere", settle_s=0, known=set())
