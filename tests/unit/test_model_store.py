"""Where a replica finds its model: a folder on its node as it is; one that is not there, a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from genloop.serving.model_store import local_model
from genloop.training.errors import UserInputError


def test_a_local_folder_is_used_in_place(tmp_path: Path):
    (tmp_path / "model").mkdir()
    assert local_model(str(tmp_path / "model"), "3") == tmp_path / "model"
    assert local_model((tmp_path / "model").as_uri(), "3") == tmp_path / "model"


def test_a_folder_on_another_machine_is_one_line_naming_the_fix(tmp_path: Path):
    with pytest.raises(UserInputError, match=r"model v3 is at file://.*/gone, which is not on this node .*"
                                             r"tracking\.artifact_location"):
        local_model((tmp_path / "gone").as_uri(), "3", cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing fetched, nothing half-written
