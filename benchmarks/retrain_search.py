"""A retrain's search on Ray Tune against the obvious manual sweep, on shifts nobody tuned for.

v1 is trained as ``genloop demo`` trains it (Python's docs, the demo's size). Then, for each new
domain, the same warm start of v1 is trained four ways and each candidate is judged by the gate
(``services.gate.evaluate``, no promotion, no live traffic: the new domain's held-out texts must
improve and the old domain's may regress by at most 2 %):
- the baseline, the manual sweep: one run per fixed replay share (0.25, 0.5, 0.75), each given the
  whole retrain budget alone (3 budgets in all);
- ours: the search (``services.search``), all its trials together within one budget.
It prints, per shift, bits per byte of each candidate against v1 on both domains, the gate's
verdict and its traffic-weighted change, the compute each spent (a share of v1's), and the search
against the best of the sweep chosen in hindsight.

    python benchmarks/retrain_search.py --new-domain builtin:python-code --new-domain FILE ...
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path

from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.demo import DEMO_DATASET, DEMO_SOURCES, SIZES
from genloop.services.evaluation_report import EvaluationReport
from genloop.services.gate import evaluate
from genloop.services.lifecycle import promote
from genloop.services.registry import Registry
from genloop.services.retrain import retrain_settings
from genloop.services.search import search_mixes, search_retrain, trial_plans
from genloop.services.selection import Selection, retrain_selection
from genloop.services.training_run import TrainingRun, train
from genloop.training.config import TrainConfig
from genloop.training.dataset_store import DatasetVersion, resolve_dataset
from genloop.training.datasets import ingest
from genloop.training.replay import build_mix

SWEEP = (0.25, 0.5, 0.75)


def judged(config: GenloopConfig, run: TrainingRun, wall: float) -> dict:
    report: EvaluationReport = evaluate(config, run.version)
    change = {name: report.metrics[name]["candidate"].bits_per_byte / report.metrics[name]["champion"].bits_per_byte
              - 1 for name in ("current", "reference")}
    return {"version": run.version, "dataset": run.dataset, "passed": report.passed,
            "new_domain_change": change["current"], "old_domain_change": change["reference"],
            "weighted_change": -report.rules[0].margin - config.gate.min_improvement,  # lower bits/byte is better
            "smallest_margin": min(rule.margin for rule in report.rules),
            "failed_rules": [rule.rule for rule in report.rules if not rule.passed],
            "compute_ratio": run.cost.compute_ratio, "wall_seconds": wall, "selection": run.selection}


def best_of(rows: list[dict]) -> dict:
    """In hindsight: the passing candidate with the largest weighted gain, else the closest to passing."""
    passing = [row for row in rows if row["passed"]]
    if passing:
        return min(passing, key=lambda r: r["weighted_change"])
    return max(rows, key=lambda r: r["smallest_margin"])


def demo_champion(home: Path, size: str) -> GenloopConfig:
    """A config on ``home`` whose champion is v1, trained as ``genloop demo`` trains it (on a local
    Ray of two CPUs); retrain_horizon.py starts from the same."""
    config = GenloopConfig(home=home)
    config.data.max_documents_per_source = 3000  # as the demo reads
    SIZES[size].apply(config)
    config.train.cpus_per_worker, config.ray.num_cpus = 0.25, 2
    connect(config.ray)
    ingest(DEMO_SOURCES, DEMO_DATASET, config.data, config.datasets_dir)
    v1 = train(config, f"{DEMO_DATASET}:v1", show_progress=False)
    promote(config, v1.version, actor="benchmark", reason="v1")
    return config


def new_domain_retrain(config: GenloopConfig, name: str, new_domain: str
                       ) -> tuple[DatasetVersion, list[DatasetVersion], TrainConfig, Selection]:
    """``new_domain`` ingested as dataset ``name``; the champion's lineage, and the default retrain's
    settings and selection on it."""
    registry = Registry(config)
    fresh = ingest([new_domain], name, config.data, config.datasets_dir).version
    lineage = registry.lineage_datasets(registry.resolve("champion"))
    seen = [resolve_dataset(config.datasets_dir, spec) for spec in lineage]
    return (fresh, seen, retrain_settings(config, registry),
            retrain_selection(config, fresh.spec, [v.spec for v in seen]))


def shift(config: GenloopConfig, index: int, new_domain: str) -> dict:
    fresh, seen, settings, selection = new_domain_retrain(config, f"shift{index}", new_domain)
    rows = {}
    for fraction in SWEEP:
        print(f"{new_domain}: replay {fraction} with the whole budget ({settings.max_steps} steps)", file=sys.stderr)
        mix = build_mix(config.datasets_dir, fresh, seen, fraction, seed=config.train.seed)
        started = time.perf_counter()
        run = train(config, mix.spec, base="champion", settings=settings, selection=selection, show_progress=False)
        rows[f"replay_{fraction}"] = judged(config, run, time.perf_counter() - started)
    print(f"{new_domain}: search, {config.scheduler.search.trials} trials within one budget", file=sys.stderr)
    plans = trial_plans(config.scheduler.search, config.scheduler.replay_fraction, settings.learning_rate,
                        config.train.seed)
    started = time.perf_counter()
    run = search_retrain(config, plans, search_mixes(config, fresh, seen, plans), settings, selection)
    ours = judged(config, run, time.perf_counter() - started)
    best = best_of(list(rows.values()))
    return {"new_domain": new_domain, "documents": fresh.manifest["counts"]["kept"],
            "budget_steps": settings.max_steps, "sweep": rows, "search": ours,
            "best_of_sweep": next(name for name, row in rows.items() if row is best),
            "search_minus_best_weighted_change": ours["weighted_change"] - best["weighted_change"],
            "search_at_least_as_good": (ours["passed"] and (not best["passed"]
                                        or ours["weighted_change"] <= best["weighted_change"])),
            "compute_ratio_search_to_sweep": ours["compute_ratio"] / sum(r["compute_ratio"] for r in rows.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-domain", action="append", required=True, help="a source, as `genloop data ingest` takes")
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--out", default=str(RESULTS / "retrain_search.json"))
    parser.add_argument("--trials", type=int, default=3, help="trials of the search (scheduler.search.trials)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        config = demo_champion(Path(folder), args.size)
        config.scheduler.search.trials = args.trials
        shifts = [shift(config, i, domain) for i, domain in enumerate(args.new_domain)]
        emit({"benchmark": "retrain_search", "size": args.size,
              "baseline": "manual sweep: replay 0.25, 0.5 and 0.75, each alone with the whole retrain budget",
              "ours": f"search on Ray Tune: {config.scheduler.search.trials} trials within one budget (ASHA)",
              "champion": {"dataset": f"{DEMO_DATASET}:v1", "steps": config.train.max_steps},
              "shifts": shifts, "wall_seconds": time.perf_counter() - started,
              "goals": {"search_at_least_as_good": True, "search_compute_ratio_at_most": 0.2}}, Path(args.out))


if __name__ == "__main__":
    main()
