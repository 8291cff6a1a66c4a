"""ingest() end to end on a real local Ray: readers, counts per drop reason, versions, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from prose import prose

from genloop.training import datasets
from genloop.training.cleaning import split_of
from genloop.training.config import DataConfig
from genloop.training.dataset_store import MANIFEST_FILE, list_versions, resolve_dataset
from genloop.training.datasets import IngestResult, _deterministic_ray_data, ingest
from genloop.training.errors import UserInputError

CONFIG = DataConfig(max_chars=3000, validation_fraction=0.5)


def one_word_changed(text: str) -> str:
    words = text.split()
    words[40] = "zeppelin"
    return " ".join(words)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")


def write_corpus(folder: Path) -> dict[str, str]:
    """Four formats, 14 documents: 7 good ones and one of each kind of junk (plus one extra duplicate)."""
    folder.mkdir(parents=True)
    docs = {k: prose(seed) for seed, k in enumerate("ABCDEFGH")}
    too_long = prose(99, words=700)
    symbols = "$$$ ^^^ ~~~ <<< >>> ||| +++ === " * 4 + "and a few words"
    boilerplate = "\n".join(["Click here to subscribe to our newsletter today"] * 6 + ["A single real line."])
    respaced_b = docs["B"].replace(" ", "  ", 5) + "   \r\n\r\n"
    # notes.txt in paragraph mode: A, B, too short, near duplicate of A
    (folder / "notes.txt").write_text(
        f"{docs['A']}\n\n{docs['B']}\n \n\nToo short.\n\n{one_word_changed(docs['A'])}\n", encoding="utf-8"
    )
    # records.jsonl: C, exact duplicate of A, symbol junk, D
    write_jsonl(folder / "records.jsonl", [docs["C"], docs["A"], symbols, docs["D"]])
    # shard.parquet: G, too long, H
    pq.write_table(pa.table({"text": [docs["G"], too_long, docs["H"]], "n": [1, 2, 3]}), folder / "shard.parquet")
    # table.csv: E, boilerplate, B with other whitespace (an exact duplicate once normalised)
    with (folder / "table.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text"])
        writer.writeheader()
        for i, text in enumerate([docs["E"], boilerplate, respaced_b]):
            writer.writerow({"id": i, "text": text})
    (folder / "README.md").write_text("not a supported type, skipped\n")
    (folder / "empty.txt").write_text("")
    return docs


def rows_of(result: IngestResult) -> list[dict]:
    version = result.version
    return pq.read_table(version.train_path).to_pylist() + pq.read_table(version.validation_path).to_pylist()


def split_sides(result: IngestResult) -> dict[str, str]:
    sides = {}
    for side, path in (("train", result.version.train_path), ("validation", result.version.validation_path)):
        for h in pq.read_table(path).column("content_hash").to_pylist():
            sides[h] = side
    return sides


def leftovers(datasets_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(datasets_dir)) for p in datasets_dir.rglob("*")) if datasets_dir.exists() else []


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory):
    """v1 from the corpus, the same corpus again, then v2 after adding one file."""
    root = tmp_path_factory.mktemp("ingest")
    corpus, datasets_dir = root / "corpus", root / "datasets"
    docs = write_corpus(corpus)
    first = ingest([str(corpus)], "corpus", CONFIG, datasets_dir)
    again = ingest([str(corpus)], "corpus", CONFIG, datasets_dir)
    write_jsonl(corpus / "more.jsonl", [prose(123), docs["C"]])
    second = ingest([str(corpus)], "corpus", CONFIG, datasets_dir)
    return {"corpus": corpus, "datasets_dir": datasets_dir, "docs": docs, "first": first, "again": again,
            "second": second}


def test_counts_per_reason_are_exact(store):
    manifest = store["first"].version.manifest
    assert store["first"].created and store["first"].version.version == 1
    assert manifest["counts"]["read"] == 14
    assert manifest["counts"]["dropped"] == {
        "too_short": 1,
        "too_long": 1,
        "too_many_symbols": 1,
        "repeated_lines": 1,
        "exact_duplicate": 2,
        "near_duplicate": 1,
    }
    assert manifest["counts"]["kept"] == 7
    assert manifest["counts"]["train"] + manifest["counts"]["validation"] == 7
    assert manifest["sources"] == [{"source": str(store["corpus"]), "licence": "unknown", "documents_read": 14}]
    assert manifest["config"] == CONFIG.model_dump(mode="json")
    assert manifest["created_at"].endswith("+00:00")


def test_files_hold_the_kept_documents_sorted_by_hash(store):
    version = store["first"].version
    train, validation = pq.read_table(version.train_path), pq.read_table(version.validation_path)
    assert train.column_names == validation.column_names == ["text", "source", "licence", "content_hash"]
    texts = set(train.column("text").to_pylist() + validation.column("text").to_pylist())
    assert texts == {store["docs"][k] for k in "ABCDEGH"}
    for table, side in ((train, "train"), (validation, "validation")):
        hashes = table.column("content_hash").to_pylist()
        assert hashes == sorted(hashes)
        assert all(split_of(h, CONFIG.validation_fraction) == side for h in hashes)
    on_disk = json.loads((Path(version.path) / MANIFEST_FILE).read_text())
    assert on_disk == version.manifest


def test_shuffled_across_partitions_the_same_documents_are_kept(store, tmp_path, monkeypatch):
    """Above one partition's worth, deduplication runs as Ray Data hash shuffles and a join (on a
    cluster, across its nodes); forced here with 4 documents per partition, it must make the same
    version, document for document, as the one-partition path."""
    monkeypatch.setattr(datasets, "ROWS_PER_PARTITION", 4)
    shuffled = ingest([str(store["corpus"])], "corpus", CONFIG, tmp_path / "datasets")
    assert rows_of(shuffled) == rows_of(store["second"])
    assert shuffled.version.manifest["counts"] == store["second"].version.manifest["counts"]


def test_extending_keeps_every_earlier_document_and_drops_their_new_twins(store, tmp_path):
    earlier = store["second"]
    write_jsonl(tmp_path / "new.jsonl", [store["docs"]["A"], one_word_changed(store["docs"]["C"]), prose(321)])
    extended = ingest([str(tmp_path / "new.jsonl")], "corpus", CONFIG, tmp_path / "datasets", extend=earlier.version)
    counts = extended.version.manifest["counts"]
    assert counts["dropped"]["exact_duplicate"] == 1 and counts["dropped"]["near_duplicate"] == 1
    assert {r["text"] for r in rows_of(extended)} == {r["text"] for r in rows_of(earlier)} | {prose(321)}


def test_first_seen_is_kept(store):
    by_text = {r["text"]: r["source"] for r in rows_of(store["first"])}
    assert by_text[store["docs"]["A"]].endswith("notes.txt")  # not records.jsonl, which repeats it
    assert by_text[store["docs"]["B"]].endswith("notes.txt")  # not table.csv


def test_reingesting_identical_input_creates_no_version(store):
    first, again = store["first"], store["again"]
    assert again.created is False
    assert again.version.version == 1
    assert again.version.content_hash == first.version.content_hash


def test_changed_input_makes_v2_and_no_document_changes_side(store):
    first, second = store["first"], store["second"]
    assert second.created and second.version.version == 2
    assert second.version.content_hash != first.version.content_hash
    counts = second.version.manifest["counts"]
    assert counts["read"] == 16 and counts["kept"] == 8 and counts["dropped"]["exact_duplicate"] == 3
    before, after = split_sides(first), split_sides(second)
    assert set(before) < set(after)
    assert all(after[h] == side for h, side in before.items())
    assert [v.version for v in list_versions(store["datasets_dir"], "corpus")] == [1, 2]
    assert not [p for p in leftovers(store["datasets_dir"]) if ".tmp" in p]


def test_resolve_dataset(store):
    datasets_dir = store["datasets_dir"]
    assert resolve_dataset(datasets_dir, "corpus").version == 2
    assert resolve_dataset(datasets_dir, "corpus:v1") == store["first"].version
    assert resolve_dataset(datasets_dir, "corpus:1").version == 1
    expected = str(datasets_dir / "corpus" / "v2" / "train.parquet")
    assert resolve_dataset(datasets_dir, "corpus:v2").train_path == expected
    with pytest.raises(UserInputError, match=r"no version 'v9'.*v1, v2"):
        resolve_dataset(datasets_dir, "corpus:v9")
    with pytest.raises(UserInputError, match=r"no dataset named 'nope'.*corpus"):
        resolve_dataset(datasets_dir, "nope")


def test_builtin_sources_produce_documents(ray_cluster, tmp_path):
    config = DataConfig(max_documents_per_source=5)
    result = ingest(["builtin:python-docs", "builtin:python-code"], "python", config, tmp_path)
    manifest = result.version.manifest
    assert [(s["source"], s["licence"], s["documents_read"]) for s in manifest["sources"]] == [
        ("builtin:python-docs", "PSF-2.0", 5),
        ("builtin:python-code", "PSF-2.0", 5),
    ]
    rows = rows_of(result)
    assert rows and manifest["counts"]["kept"] == len(rows)
    assert {r["licence"] for r in rows} == {"PSF-2.0"}
    assert any(r["source"].startswith("builtin:python-docs/topics/") for r in rows)
    code = [r for r in rows if r["source"].startswith("builtin:python-code/")]
    assert code and all("site-packages" not in r["source"] and "/test" not in r["source"] for r in code)
    assert any("\n    " in r["text"] for r in code)  # code keeps its line structure and indentation


def test_cap_takes_the_first_documents_in_sorted_path_order(ray_cluster, tmp_path):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "b.jsonl", [prose(13), prose(14), prose(15)])
    write_jsonl(tmp_path / "src" / "a.jsonl", [prose(10), prose(11), prose(12)])
    config = DataConfig(max_documents_per_source=4)
    result = ingest([str(tmp_path / "src" / "*.jsonl")], "capped", config, tmp_path / "datasets")
    rows = rows_of(result)
    assert sorted(r["text"] for r in rows) == sorted(prose(s) for s in (10, 11, 12, 13))
    assert result.version.manifest["counts"]["read"] == 4


def test_whole_file_mode_and_pii_scrubbing(ray_cluster, tmp_path):
    text = f"{prose(20)}\n\nWrite to someone@example.org or call 555-123-4567 from 10.0.0.7 today."
    (tmp_path / "letter.txt").write_text(text, encoding="utf-8")
    config = DataConfig(txt_mode="file", scrub_pii=True, licence="CC-BY-4.0")
    result = ingest([str(tmp_path / "letter.txt")], "letters", config, tmp_path / "datasets")
    rows = rows_of(result)
    scrubbed = text.replace("someone@example.org", "<EMAIL>").replace("555-123-4567", "<PHONE>")
    assert [r["text"] for r in rows] == [scrubbed.replace("10.0.0.7", "<IP>")]
    assert rows[0]["licence"] == "CC-BY-4.0"


def make_bad(kind: str, folder: Path) -> str:
    folder.mkdir()
    good = folder / "good.txt"
    good.write_text(prose(30), encoding="utf-8")
    if kind == "non-utf8":
        (folder / "latin1.txt").write_bytes("caf\u00e9 au lait, ".encode("latin-1") * 10)
        return str(folder)
    if kind == "missing-field-jsonl":
        write_jsonl(folder / "data.jsonl", [prose(31)], field="body")
        return str(folder / "data.jsonl")
    if kind == "missing-field-csv":
        (folder / "data.csv").write_text(f"id,body\n1,{prose(32)}\n", encoding="utf-8")
        return str(folder / "data.csv")
    if kind == "missing-field-parquet":
        pq.write_table(pa.table({"body": [prose(33)]}), folder / "data.parquet")
        return str(folder / "data.parquet")
    if kind == "empty-file":
        (folder / "empty.jsonl").write_text("")
        return str(folder / "empty.jsonl")
    if kind == "blank-file":
        (folder / "blank.txt").write_text("\n   \n\n")
        return str(folder / "blank.txt")
    if kind == "no-readable-files":
        good.unlink()
        (folder / "notes.md").write_text(prose(34))
        return str(folder)
    if kind == "glob-nothing":
        return str(folder / "*.parquet")
    if kind == "unsupported":
        (folder / "notes.md").write_text(prose(35))
        return str(folder / "notes.md")
    if kind == "nonexistent":
        return str(folder / "missing")
    if kind == "unknown-builtin":
        return "builtin:cobol-docs"
    if kind == "all-filtered":
        good.write_text("tiny\n\nsmall\n\nshort", encoding="utf-8")
        return str(good)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("non-utf8", r"latin1\.txt: not valid UTF-8"),
        ("missing-field-jsonl", r"data\.jsonl: line 1 has no text field 'text'"),
        ("missing-field-csv", r"data\.csv: no column 'text'.*columns: id, body"),
        ("missing-field-parquet", r"data\.parquet: no string column 'text'"),
        ("empty-file", r"empty\.jsonl: file is empty"),
        ("blank-file", r"blank\.txt' has no documents"),
        ("no-readable-files", r"folder .* has no readable files"),
        ("glob-nothing", r"glob .* matches nothing"),
        ("unsupported", r"notes\.md: unsupported file type '\.md'"),
        ("nonexistent", r"missing' does not exist"),
        ("unknown-builtin", r"unknown builtin source 'builtin:cobol-docs'; available: builtin:python-code"),
        ("all-filtered", r"nothing left after cleaning: all 3 documents were dropped \(too_short: 3\)"),
    ],
)
def test_bad_input_raises_and_leaves_nothing_behind(ray_cluster, tmp_path, kind, message):
    datasets_dir = tmp_path / "datasets"
    with pytest.raises(UserInputError, match=message):
        ingest([make_bad(kind, tmp_path / "src")], "bad", CONFIG, datasets_dir)
    assert leftovers(datasets_dir) == []


def test_failure_while_writing_leaves_only_complete_versions(ray_cluster, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(prose(40), encoding="utf-8")
    datasets_dir = tmp_path / "datasets"
    ingest([str(tmp_path / "a.txt")], "atomic", CONFIG, datasets_dir)
    (tmp_path / "a.txt").write_text(prose(41), encoding="utf-8")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ingest([str(tmp_path / "a.txt")], "atomic", CONFIG, datasets_dir)
    files = ["manifest.json", "train.parquet", "validation.parquet"]
    assert leftovers(datasets_dir) == ["atomic", "atomic/v1"] + [f"atomic/v1/{f}" for f in files]


def test_ingest_preserves_row_order_and_restores_the_callers_settings():
    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    with _deterministic_ray_data():
        assert ctx.execution_options.preserve_order is True  # a source's cap takes its first documents
        assert ctx.enable_progress_bars is False
    assert (ctx.execution_options.preserve_order, ctx.enable_progress_bars) == before
