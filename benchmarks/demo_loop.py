"""The demo's loop at full size: what `make demo` shows, measured, with the champion beside the retrain.

Runs ``genloop demo --size SIZE`` exactly as a user does (a subprocess, a fresh GENLOOP_HOME, the
machine's two CPUs) and reads what it left: bits per byte of v1 (the champion, the baseline) and v2
(the retrain) on the old domain, the new domain and the live prompts, as ratios; the drift verdicts
before and after the shift; requests served and failed; the training runs' cost and compute; and the
wall time of the whole demo. The end-to-end test runs the same loop at ``--size small``; this is
where the full-size figures live (benchmarks/results/demo_loop.json).

    python benchmarks/demo_loop.py [--size full|small] [--new-domain builtin:python-code]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import RESULTS, emit, free_port  # benchmarks/ is the script's folder, on sys.path

from genloop.services.config import GenloopConfig
from genloop.services.evaluation_report import EvaluationReport
from genloop.services.registry import Registry
from genloop.services.scheduler import JobHistory
from genloop.serving.inference_log import read_inference_log
from genloop.training.cost import logged_cost


def run(size: str, new_domain: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}, "GENLOOP_HOME": "state",
               "GENLOOP_RAY__NUM_CPUS": "2", "GENLOOP_SERVING__PORT": str(free_port()), "COLUMNS": "160"}
        started = time.perf_counter()
        print(f"genloop demo --size {size} ...", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, "-m", "genloop.services.cli", "demo", "--size", size,
                                 "--new-domain", new_domain], cwd=folder, env=env, capture_output=True, text=True,
                                timeout=3600)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"demo failed ({result.returncode}): {result.stderr[-2000:]}")
        config = GenloopConfig(home=Path(folder) / "state")
        registry = Registry(config)
        v1, v2 = registry.versions()[:2]
        report = EvaluationReport.model_validate_json(
            (config.reports_dir / "evaluations" / f"{v2.tags['evaluation_report']}.json").read_text())
        domains = {}
        for name, label in (("reference", "old_domain"), ("current", "new_domain"), ("live", "live_prompts")):
            if name in report.metrics:
                before, after = (report.metrics[name][who].bits_per_byte for who in ("champion", "candidate"))
                domains[label] = {"v1_bits_per_byte": before, "v2_bits_per_byte": after,
                                  "ratio_v2_to_v1": after / before}
        drift = [run for run in reversed(JobHistory(config.scheduler_db).recent()) if run.job == "drift"]
        served = read_inference_log(config.inference_log_dir)
        statuses = served.column("status").to_pylist()
        costs = {}
        for version in (v1, v2):
            cost = logged_cost(registry.client.get_run(version.run_id).data.metrics)
            costs[f"v{version.version}"] = {"cost_usd": cost.cost_usd, "energy_kwh": cost.energy_kwh,
                                            "compute_ratio": cost.compute_ratio,
                                            "tokens_per_second": cost.tokens_per_second}
        return {
            "wall_seconds": wall,
            "promoted": report.passed,
            "gate_weights": report.weights,
            "bits_per_byte": domains,
            "drift": [{"outcome": run.outcome, "detail": run.detail} for run in drift],
            "requests": {"answered": statuses.count(200), "failed": sum(s != 200 for s in statuses)},
            "training": costs,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--new-domain", default="builtin:python-code")
    args = parser.parse_args()
    figures = run(args.size, args.new_domain)
    emit({"benchmark": "demo_loop", "size": args.size, "new_domain": args.new_domain,
          "baseline": "v1, the champion before the shift", **figures,
          "goals": {"new_domain_ratio_at_most": 0.85, "old_domain_ratio_at_most": 1.02, "failed_requests": 0}},
         RESULTS / ("demo_loop.json" if args.size == "full" else f"demo_loop_{args.size}.json"))


if __name__ == "__main__":
    main()
