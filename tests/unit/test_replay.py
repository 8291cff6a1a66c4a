"""Training mixes: new documents plus a replay share of what the champion saw, traceable as a version."""

from __future__ import annotations

import pyarrow.parquet as pq
from dataset_factory import write_dataset as version

from genloop.training.replay import build_mix, new_documents


def test_mix_holds_the_new_documents_and_a_replay_share_of_the_old_text(tmp_path):
    old = version(tmp_path, "docs", 1, [f"old document {i} " * 5 for i in range(40)], ["old held out"])
    known = "old document 0 " * 5  # already seen: not new, not replayed twice
    fresh = version(tmp_path, "live", 1, [f"new text {i} " * 10 for i in range(10)] + [known], ["new held out"])
    assert new_documents(fresh, [old]) == 10

    mix = build_mix(tmp_path, fresh, [old], fraction=0.25, seed=0)
    train = pq.read_table(mix.train_path).column("text").to_pylist()
    new = [t for t in train if t.startswith("new")]
    replayed = [t for t in train if t.startswith("old")]
    assert sorted(new) == sorted(f"new text {i} " * 10 for i in range(10)) and train.count(known) <= 1
    share = sum(map(len, replayed)) / sum(map(len, train))
    assert 0.25 <= share < 0.25 + len(replayed[0]) / sum(map(len, train))  # a quarter of the text, one doc over
    assert pq.read_table(mix.validation_path).column("text").to_pylist() == ["new held out"]
    assert mix.spec == "live-mix:v1" and mix.manifest["base"] == "live:v1"
    assert {k: mix.manifest["replay"][k] for k in ("fraction", "versions", "documents")} == {
        "fraction": 0.25, "versions": ["docs:v1"], "documents": len(replayed)}
    assert mix.manifest["counts"]["new"] == 10

    assert build_mix(tmp_path, fresh, [old], fraction=0.25, seed=0).spec == "live-mix:v1"  # same mix, same version
    without = build_mix(tmp_path, fresh, [old], fraction=0.0, seed=0)
    assert without.spec == "live-mix:v2" and without.manifest["counts"]["replay"] == 0
    assert build_mix(tmp_path, old, [old], fraction=0.5) is None  # nothing new: no mix


def test_replay_takes_what_there_is_when_the_old_data_is_small(tmp_path):
    old = version(tmp_path, "docs", 1, ["a short old document"], ["x"])
    fresh = version(tmp_path, "live", 1, ["a much longer new document " * 50], ["y"])
    mix = build_mix(tmp_path, fresh, [old], fraction=0.9)
    counts = mix.manifest["counts"]
    assert (counts["new"], counts["replay"], counts["train"]) == (1, 1, 2)
