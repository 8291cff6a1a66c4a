"""How a warm start's settings and its share of the budget trade learning against forgetting.

v1 is trained as ``genloop demo`` trains it; then single warm starts of v1 on one new domain, each
at a replay share, a multiple of the retrain's default peak learning rate, a share of the 20 %
budget's steps and a micro-batch, every one judged by the gate (bits per byte against v1 on the new
domain's and the old domain's held-out texts). Each row carries the run's own selection-set curve
(new and old domain against v1, at every 8th step), so the shape shows: the old domain is forgotten
while the rate is high and comes back as it decays. The baseline is the retrain's default (the
first variant given).

This is what says whether a search that splits the budget between trials can match one run given
all of it: a trial with half the budget has half the decay to recover in.

    python benchmarks/retrain_horizon.py --new-domain FILE --variant 0.5,1,1 --variant 0.5,2,0.5,4 ...
    (REPLAY,LR_SCALE,BUDGET_SHARE[,MICRO_BATCH]; LR_SCALE multiplies the retrain's default peak)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from report import RESULTS, emit  # benchmarks/ is the script's folder, on sys.path
from retrain_search import demo_champion, judged, new_domain_retrain

from genloop.services.registry import Registry
from genloop.services.training_run import train
from genloop.training.replay import build_mix

CURVE_EVERY = 8  # steps between evaluations: the curve's resolution


def variant(text: str) -> tuple[float, float, float, int | None]:
    parts = [float(part) for part in text.split(",")]
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError("REPLAY,LR_SCALE,BUDGET_SHARE[,MICRO_BATCH]")
    return parts[0], parts[1], parts[2], int(parts[3]) if len(parts) == 4 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-domain", required=True, help="a source, as `genloop data ingest` takes")
    parser.add_argument("--variant", type=variant, action="append", required=True)
    parser.add_argument("--out", default=str(RESULTS / "retrain_horizon.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        config = demo_champion(Path(folder), "full")
        registry = Registry(config)
        fresh, seen, default, selection = new_domain_retrain(config, "shift", args.new_domain)
        for replay, scale, share, micro_batch in args.variant:
            steps = max(1, round(default.max_steps * share))
            settings = default.model_copy(update={
                "learning_rate": default.learning_rate * scale, "max_steps": steps, "eval_every": CURVE_EVERY,
                "warmup_steps": min(default.warmup_steps, steps // 10), "patience": steps,
                "micro_batch_size": micro_batch or default.micro_batch_size})
            mix = build_mix(config.datasets_dir, fresh, seen, replay, seed=config.train.seed)
            began = time.perf_counter()
            run = train(config, mix.spec, base="champion", settings=settings, selection=selection, show_progress=False)
            row = judged(config, run, time.perf_counter() - began)
            losses = {key: {m.step: m.value for m in registry.client.get_metric_history(run.run_id, key)}
                      for key in ("val_loss", "val_loss_reference")}
            new, old = losses["val_loss"], losses["val_loss_reference"]
            row.update(replay=replay, learning_rate_scale=scale, learning_rate=settings.learning_rate,
                       budget_share=share * settings.micro_batch_size / default.micro_batch_size, steps=steps,
                       micro_batch=settings.micro_batch_size,
                       selection_curve=[[step, new[step] / new[0] - 1, old[step] / old[0] - 1] for step in sorted(new)])
            rows.append(row)
        base = rows[0]
        for row in rows:
            row["new_domain_gain_vs_baseline"] = row["new_domain_change"] / base["new_domain_change"]
        emit({"benchmark": "retrain_horizon", "new_domain": args.new_domain, "budget_steps": default.max_steps,
              "default_learning_rate": default.learning_rate,
              "baseline": "the first variant", "variants": rows,
              "wall_seconds": time.perf_counter() - started}, Path(args.out))


if __name__ == "__main__":
    main()
