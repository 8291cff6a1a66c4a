"""Ingestion at scale: synthetic corpora up to 1 M documents, documents/s and peak memory per process.

The corpus: JSON Lines shards of 50,000 documents each, 40–120 words from a 5,000-word vocabulary,
with planted duplicates (5 % exact copies and 5 % one-word edits of an earlier document, so the
deduplication has work at every size). Each run is its own process with its own local Ray
(``--cpus``, 2 by default), so its peak memory is its own.

- ``ours``: ``genloop.training.datasets.ingest``, the whole ingest (read, clean, MinHash, the
  distributed deduplication, sort, write), at each of ``--sizes``. Reported: wall seconds,
  documents/s, the driver's peak resident memory (RSS) and peak private memory (USS: RSS also
  counts the object-store pages the driver streamed the kept rows from, shared memory that Ray
  owns), the largest Ray worker's peak RSS (sampled every 0.5 s) and what was kept and dropped.
- ``baseline``: the single-process duplicate index genloop used before (``tests/dedup_reference.py``,
  a MinHash LSH of every kept document in the driver), fed the same documents' signatures, at each
  of ``--baseline-sizes``: the driver memory that design needed for the duplicate step alone.

The goal (the cluster issue): driver memory flat in corpus size, where the baseline grows by about
5 KB per document (its memory is all private: no object store).

    python benchmarks/ingest_scale.py [--sizes 100000,1000000] [--baseline-sizes 100000,300000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path

SHARD = 50_000
REPO = Path(__file__).resolve().parent.parent


def make_corpus(folder: Path, documents: int, seed: int = 0) -> None:
    """``documents`` documents in shards under ``folder``; 90 % originals, 5 % copies, 5 % edits."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    vocab = np.array(sorted({"".join(rng.choice(syllables, 3)) for _ in range(6000)})[:5000])
    folder.mkdir(parents=True)
    texts: list[str] = []
    for i in range(documents):
        roll = rng.random()
        if texts and roll < 0.05:
            texts.append(texts[rng.integers(len(texts))])
        elif texts and roll < 0.10:
            words = texts[rng.integers(len(texts))].split()
            words[rng.integers(len(words))] = "zeppelin"
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(vocab[rng.integers(len(vocab), size=rng.integers(40, 121))]))
        if len(texts) % SHARD == 0 or i == documents - 1:
            shard = folder / f"shard-{(i // SHARD):04d}.jsonl"
            start = (i // SHARD) * SHARD
            shard.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[start:]), encoding="utf-8")
    (folder / "texts.json").write_text(json.dumps(len(texts)))


class MemoryPeaks:
    """Sampled every 0.5 s: the largest resident memory of any Ray worker process (``ray::…``), and this
    process's peak private memory (USS). Its RSS also counts the pages of Ray's object store it has
    read blocks from (shared memory, mapped zero-copy), which grows with whatever passed through it;
    its private memory is what its own work holds."""

    def __init__(self) -> None:
        self.worker_peak_mb = 0.0
        self.private_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.5):
            self.private_peak_mb = max(self.private_peak_mb, me.memory_full_info().uss / 2**20)
            for proc in psutil.process_iter(["name", "memory_info"]):
                try:
                    if (proc.info["name"] or "").startswith("ray::") and proc.info["memory_info"]:
                        self.worker_peak_mb = max(self.worker_peak_mb, proc.info["memory_info"].rss / 2**20)
                except psutil.Error:
                    continue

    def __enter__(self) -> MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_ours(corpus: Path, cpus: int) -> dict:
    import ray

    from genloop.training.config import DataConfig
    from genloop.training.datasets import ingest

    documents = json.loads((corpus / "texts.json").read_text())
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    data = DataConfig(max_chars=10_000)
    with tempfile.TemporaryDirectory() as out, MemoryPeaks() as peaks:
        started = time.perf_counter()
        result = ingest([str(p) for p in sorted(corpus.glob("shard-*.jsonl"))], "scale", data, Path(out))
        seconds = time.perf_counter() - started
    counts = result.version.manifest["counts"]
    return {"documents": documents, "seconds": round(seconds, 1), "documents_per_s": round(documents / seconds),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "driver_peak_private_mb": round(peaks.private_peak_mb),
            "largest_worker_peak_rss_mb": round(peaks.worker_peak_mb), "kept": counts["kept"],
            "exact_duplicates": counts["dropped"]["exact_duplicate"],
            "near_duplicates": counts["dropped"]["near_duplicate"]}


def measure_baseline(corpus: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from dedup_reference import DuplicateIndex

    from genloop.training.cleaning import content_hash, minhash_signatures, normalise
    from genloop.training.config import DataConfig

    data = DataConfig()
    index = DuplicateIndex(data.near_dup_threshold, data.minhash_num_perm)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    documents, dropped = 0, 0
    for shard in sorted(corpus.glob("shard-*.jsonl")):
        texts = [normalise(json.loads(line)["text"]) for line in shard.read_text(encoding="utf-8").splitlines()]
        signatures = minhash_signatures(texts, data.minhash_num_perm, data.shingle_words)
        for text, signature in zip(texts, signatures, strict=True):
            dropped += index.add(content_hash(text), signature) is not None
        documents += len(texts)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"documents": documents, "seconds": round(seconds, 1), "documents_per_s": round(documents / seconds),
            "driver_peak_rss_mb": round(peak), "index_mb": round(peak - before),
            "kb_per_document": round((peak - before) * 1024 / documents, 2), "dropped": dropped}


def run(kind: str, corpus: Path, cpus: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", kind, str(corpus), str(cpus)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--baseline-sizes", default="100000,300000")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest_scale.json")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, corpus, cpus = args.measure
        result = measure_ours(Path(corpus), int(cpus)) if kind == "ours" else measure_baseline(Path(corpus))
        print(json.dumps(result))
        return
    sizes = sorted({int(n) for n in args.sizes.split(",")} | {int(n) for n in args.baseline_sizes.split(",")})
    ours, baseline = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            corpus = Path(tmp) / f"corpus-{size}"
            make_corpus(corpus, size)
            if str(size) in args.sizes.split(","):
                ours[size] = run("ours", corpus, args.cpus)
                print(f"ours {size}: {ours[size]}", file=sys.stderr)
            if str(size) in args.baseline_sizes.split(","):
                baseline[size] = run("baseline", corpus, args.cpus)
                print(f"baseline {size}: {baseline[size]}", file=sys.stderr)
    smallest, largest = min(ours), max(ours)
    report = {
        "load_average_1m": os.getloadavg()[0],
        "cpus": args.cpus,
        "ours": {str(k): v for k, v in ours.items()},
        "baseline_driver_side_index": {str(k): v for k, v in baseline.items()},
        "ours_driver_growth": {
            "documents_ratio": largest / smallest,
            "driver_peak_rss_ratio": ours[largest]["driver_peak_rss_mb"] / ours[smallest]["driver_peak_rss_mb"],
            "driver_peak_private_ratio": ours[largest]["driver_peak_private_mb"]
            / ours[smallest]["driver_peak_private_mb"],
        },
        "same_number_dropped_as_baseline": {
            str(size): ours[size]["exact_duplicates"] + ours[size]["near_duplicates"] == baseline[size]["dropped"]
            for size in ours if size in baseline},
        "driver_peak_rss_ours_vs_baseline": {
            str(size): ours[size]["driver_peak_rss_mb"] / baseline[size]["driver_peak_rss_mb"]
            for size in ours if size in baseline},
        "driver_peak_private_ours_vs_baseline_rss": {
            str(size): ours[size]["driver_peak_private_mb"] / baseline[size]["driver_peak_rss_mb"]
            for size in ours if size in baseline},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
