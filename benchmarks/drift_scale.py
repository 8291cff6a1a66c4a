"""Drift check at scale: 10,000 logged prompts, time and peak memory, bounded sampling vs all rows.

Each variant runs ``genloop drift``'s code path (``run_drift_check``: inference log → Evidently
report with the champion's descriptors → HTML + JSON + MLflow) in its own process on the same
state: a champion (the ``tiny`` preset with a tokenizer trained on the pydoc topics), its training
dataset, and N prompts in the inference log (pydoc and stdlib-code prefixes, half each):

- ``all_rows``: ``drift_max_samples`` above N, the baseline that scores every prompt;
- ``bounded``: genloop's default cap (2,000 per side).

Reported per variant: wall seconds of the check, peak resident memory of the process (MB), and
the verdict; plus bounded/all ratios. Goal: 10,000 prompts in under 30 s with memory that does
not grow with N (compare ``--prompts 1000`` and ``--prompts 10000``).

    python benchmarks/drift_scale.py [--prompts 10000] [--out benchmarks/results/drift_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path


def prepare(home: Path, prompts: int) -> None:
    """Champion, its dataset and ``prompts`` logged prompts under ``home``."""
    import pydoc_data.topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    from genloop.services.config import GenloopConfig
    from genloop.services.registry import MODEL_ARTIFACT, Registry
    from genloop.serving.inference_log import InferenceLog, InferenceRecord
    from genloop.training.dataset_store import MANIFEST_FILE, TRAIN_FILE, VALIDATION_FILE
    from genloop.training.models import build_model
    from genloop.training.tokenizer import train_tokenizer

    config = GenloopConfig(home=home)
    docs = [p for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p.split()) >= 8]
    code = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        code += ["\n".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]
    rng = random.Random(0)
    rng.shuffle(docs)
    folder = Path(config.datasets_dir) / "docs" / "v1"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": docs[: len(docs) // 2]}), folder / TRAIN_FILE)
    pq.write_table(pa.table({"text": docs[:10]}), folder / VALIDATION_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps({"content_hash": "docs", "counts": {}, "created_at": "now"}))

    tokenizer = train_tokenizer(docs[:2000], vocab_size=2048)
    model_dir = home / "model"
    build_model("tiny", tokenizer, block_size=256, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    registry = Registry(config)
    run = registry.client.create_run(registry.experiment_id())
    registry.client.log_artifacts(run.info.run_id, str(model_dir), MODEL_ARTIFACT)
    registry.client.set_terminated(run.info.run_id, "FINISHED")
    version = registry.register(run.info.run_id, tags={"dataset": "docs:v1"}).version
    registry.client.set_registered_model_alias(registry.name, "champion", str(version))

    log = InferenceLog(config.inference_log_dir, max_buffer=prompts + 1)
    pool = docs[len(docs) // 2:] + code
    for i in range(prompts):
        text = pool[rng.randrange(len(pool))].split()
        log.append(InferenceRecord(request_id=f"r{i}", route="completions", model_version=str(version),
                                   status=200, prompt=" ".join(text[: rng.randint(8, 48)])))
    log.close()


def measure(home: Path, max_samples: int) -> dict:
    """One drift check; runs in its own process so its peak memory is its own."""
    from genloop.services.config import GenloopConfig
    from genloop.services.drift_check import run_drift_check

    config = GenloopConfig(home=home)
    config.monitoring.drift_max_samples = max_samples
    started = time.perf_counter()
    result = run_drift_check(config)
    return {"seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "verdict": result.verdict, "reference_samples": result.reference_samples,
            "current_samples": result.current_samples, "drifted": result.drifted_features}


def run_variant(home: Path, max_samples: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(home), str(max_samples)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--bounded", type=int, default=2000, help="drift_max_samples of the bounded variant")
    parser.add_argument("--out", type=Path, default=RESULTS / "drift_scale.json")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), int(args.measure[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        prepare(home, args.prompts)
        bounded = run_variant(home, args.bounded)
        all_rows = run_variant(home, args.prompts + 1)
    report = {
        "load_average_1m": os.getloadavg()[0],
        "prompts_logged": args.prompts,
        "bounded": bounded,
        "all_rows": all_rows,
        "ratios_bounded_vs_all_rows": {"seconds": bounded["seconds"] / all_rows["seconds"],
                                       "peak_rss_mb": bounded["peak_rss_mb"] / all_rows["peak_rss_mb"]},
        "goal_under_30_s": bounded["seconds"] < 30,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
