"""``genloop demo``: the loop's whole story on a real domain shift, unattended.

Each stage runs for real (Ray Data ingestion, Ray Train on CPU workers, the MLflow registry, the
gate and promotion, Ray Serve, the inference log, the scheduler's jobs):

1. v1 is trained from scratch on Python's docs and promoted on the absolute bounds.
2. v1 serves held-out docs prompts: the drift job finds no drift.
3. Traffic turns to a new domain (any text corpus; by default Python's own source code) while that
   domain's documents land in the watched ``incoming`` folder. The drift job finds drift and starts
   the retrain: the landed files become a dataset version, the training mix replays part of v1's
   data, the warm start keeps to the compute budget, and the gate weighs the sets by live traffic.
4. v2 is rolled out under that live traffic, and every request is counted.

It ends with one table of what a user wants to know: each domain's bits per byte before and after,
the drift scores, requests served and failed, and what each training run cost.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from genloop.monitoring.traffic import prompt_prefixes
from genloop.services.cluster import connect
from genloop.services.config import GenloopConfig
from genloop.services.console import log_path
from genloop.services.registry import Registry
from genloop.services.retrain import RetrainResult, retrain
from genloop.services.scheduler import GenloopScheduler, JobRun
from genloop.services.serving_control import start_serving, stop_serving
from genloop.serving.inference_log import read_inference_log
from genloop.serving.protocol import VERSION_HEADER
from genloop.training.cleaning import VALIDATION, clean, content_hash, split_of
from genloop.training.datasets import ingest
from genloop.training.errors import UserInputError
from genloop.training.sources import resolve_source


class DemoSize(BaseModel):
    """How much the demo does at each stage; every stage runs at every size.

    ``full`` is the tour ``make demo`` gives (a few minutes on two cores); ``small`` is the same loop,
    the same code path and the same story (no drift, then drift, a retrain the gate promotes under
    traffic) scored on fewer held-out texts and prompts: what the end-to-end test runs, and a first
    look on a slow machine. None keeps the configuration's own value.
    """

    model_config = ConfigDict(frozen=True)

    max_steps: int = Field(description="Training steps of the first model; the retrain's follow from the budget.")
    eval_texts: int | None = Field(None, description="evaluation.max_texts")
    eval_prompts: int | None = Field(None, description="evaluation.prompts")
    eval_new_tokens: int | None = Field(None, description="evaluation.max_new_tokens")
    eval_stride: int | None = Field(None, description="evaluation.stride")

    def apply(self, config: GenloopConfig) -> None:
        config.train.max_steps = self.max_steps
        config.train.eval_every = max(10, self.max_steps // 6)
        for name, value in (("max_texts", self.eval_texts), ("prompts", self.eval_prompts),
                            ("max_new_tokens", self.eval_new_tokens), ("stride", self.eval_stride)):
            if value is not None:
                setattr(config.evaluation, name, value)


SIZES = {
    "full": DemoSize(max_steps=120),
    # 120 steps, as at full size: v1 less trained leaves the retrain's 20 % budget too little of the
    # new domain for the ≥ 15 % the end-to-end test asks (measured with warm starts at 1x the rate:
    # 60 steps, new domain -10.5 %; 90 steps, -15.2 %; 120 steps, -17.6 % and the old domain -1.1 %;
    # at today's 2x, 120 steps: -21.0 % and -0.4 %, 7.5 min wall alone).
    # Stride 128: the new domain's held-out files are long (60 of them are ~120k tokens), and at the
    # default stride of 64 scoring them twice was a fifth of the small demo's time; every token is
    # still scored with at least 128 tokens of context.
    "small": DemoSize(max_steps=120, eval_texts=60, eval_prompts=8, eval_new_tokens=24, eval_stride=128),
}

DEMO_DATASET = "python-docs"
DEMO_SOURCES = ["builtin:python-docs"]
NEW_DOMAIN = "builtin:python-code"
LIVE_DATASET = "live"  # the scheduler's dataset: what lands in incoming
TRAFFIC = 60  # new-domain prompts before the drift check: above monitoring.drift_min_samples
# Same-domain prompts: a drift score is a distance between two samples, and on 60 prompts the
# sampling noise alone reaches the threshold; 200 keep it well below.
SAME_DOMAIN_TRAFFIC = 200
CLIENTS = 4
ANSWER_TOKENS = 8  # max_tokens of each demo request
INCOMING_PARTS = 3  # the new domain's documents land as this many files


class DemoFailed(RuntimeError):
    """The demo ran, but its story did not happen (no drift after the shift, a failed request):
    the CLI says so in one line and exits 1."""


@dataclass
class Traffic:
    """Greedy completions sent one after another from a thread until stopped; what came back."""

    url: str
    model: str
    prompts: list[str]
    served: dict[str, int] = field(default_factory=dict)  # version → answers
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # several clients may share the counts
    _thread: threading.Thread | None = None

    def send(self, prompt: str, max_tokens: int = ANSWER_TOKENS) -> tuple[str, str] | None:
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        request = urllib.request.Request(self.url, data=body.encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                text, version = json.load(response)["choices"][0]["text"], response.headers[VERSION_HEADER]
        except urllib.error.HTTPError as exc:  # the server's answer says why
            self._fail(f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}")
            return None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, KeyError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return None
        with self._lock:
            self.served[version] = self.served.get(version, 0) + 1
        return text, version

    def _fail(self, error: str) -> None:
        with self._lock:
            self.failed.append(error)

    def start(self, limit: int, seconds: float) -> Traffic:
        """Cycle through the prompts in the background, at most ``limit`` requests or ``seconds``."""
        def loop() -> None:
            deadline = time.time() + seconds
            for i in range(limit):
                if self._stop.is_set() or time.time() > deadline:
                    return
                self.send(self.prompts[i % len(self.prompts)])
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=loop, name="demo-traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=180)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def total(self) -> int:
        return sum(self.served.values()) + len(self.failed)


def run_demo(config: GenloopConfig, console: Console, new_domain: str = NEW_DOMAIN, size: DemoSize = SIZES["full"],
             max_steps: int | None = None) -> None:
    # Both sizes read the same documents: fewer leave too few held-out prompts for the same-domain
    # drift check (1,000 documents gave 59, and sampling noise alone read as drift).
    cap = config.data.max_documents_per_source or 3000
    config.data.max_documents_per_source = cap
    size = size.model_copy(update={"max_steps": max_steps}) if max_steps is not None else size
    size.apply(config)
    new_source = resolve_source(new_domain, config.data)  # a bad PATH fails here, before any work
    # Training runs beside the serving replica: reserve little of Ray's CPUs for each, so Ray Data
    # keeps one to stream the shards (torch threads stay at one per worker either way).
    config.serving.replica_cpus = config.train.cpus_per_worker = 0.25
    config.serving.watch_interval_s = 2
    incoming = config.home / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    config.scheduler.sources, config.scheduler.incoming, config.scheduler.incoming_settle_s = [], incoming, 1
    config.scheduler.window = None
    connect(config.ray)  # before ingest: Ray Data would otherwise start (or join) a Ray of its own choosing

    console.rule("[bold]1 · v1: Python's docs → train from scratch → gate → champion")
    result = ingest(DEMO_SOURCES, DEMO_DATASET, config.data, config.datasets_dir, show_progress=True)
    counts = result.version.manifest["counts"]
    console.print(f"dataset {result.version.spec}: {counts['kept']} documents kept of {counts['read']}")
    config.scheduler.dataset = DEMO_DATASET
    first = retrain(config, "demo", show_progress=True, actor="genloop demo")
    _show_round(config, first, console)
    config.scheduler.dataset = LIVE_DATASET

    registry = Registry(config)
    champion_dir = registry.local_path(registry.resolve("champion"))
    old_prompts = fitting(_prompts(result.version.texts(), config), champion_dir)
    new_docs = _documents(new_source, config)
    new_prompts = fitting(_prompts([text for text in new_docs if split_of(
        content_hash(text), config.data.validation_fraction) == VALIDATION], config), champion_dir)
    if len(new_prompts) < 10:
        raise UserInputError(f"{new_domain}: {len(new_docs)} documents give {len(new_prompts)} held-out prompts; "
                             "the demo needs a corpus of at least a few hundred documents")
    scheduler = GenloopScheduler(config)
    url = f"http://{config.serving.host}:{config.serving.port}/v1/completions"
    watcher = start_serving(config)
    try:
        console.rule("[bold]2 · same-domain traffic → drift job")
        phase = time.time()
        same = Traffic(url, config.serving.model_name, old_prompts)
        with ThreadPoolExecutor(CLIENTS) as clients:  # the engine batches concurrent requests
            list(clients.map(same.send, old_prompts[:SAME_DOMAIN_TRAFFIC]))
        same_drift = _drift(config, scheduler, since=phase, rows=same.total, console=console)

        console.rule(f"[bold]3 · traffic turns to {new_domain}; its documents land in {incoming}")
        phase = time.time()
        live = Traffic(url, config.serving.model_name, new_prompts).start(limit=5000, seconds=1800)
        _land(new_docs, incoming, config.scheduler.incoming_settle_s)
        # A failed request does not end the wait: the drift check needs TRAFFIC answered prompts,
        # and the failures are reported below, whatever the check finds.
        while sum(live.served.values()) < TRAFFIC and time.time() - phase < 300:
            time.sleep(0.5)
        config.scheduler.retrain_on_drift = False  # the retrain below is the one this drift starts
        new_drift = _drift(config, scheduler, since=phase, rows=same.total + live.total, console=console)
        if new_drift.outcome != "drift":
            live.stop()
            raise DemoFailed(f"no drift found after the shift ({new_drift.detail}); "
                             f"{_failures(same, live) or 'no request failed'}")
        config.scheduler.retrain_on_drift = True
        console.rule("[bold]4 · drift → retrain: landed files → replay mix → budgeted warm start → gate")
        second = retrain(config, "drift", show_progress=True, actor="genloop demo")
        _show_round(config, second, console)
        if second.outcome == "promoted":
            deadline = time.time() + 300
            while live.served.get(second.version, 0) < 10 and time.time() < deadline and live.running:
                time.sleep(0.5)
        live.stop()
        _wait_for_log(config, same.total + live.total)
        _summary(config, console, first, second, same_drift, new_drift, same, live)
    finally:
        watcher.stop()
        stop_serving(own_cluster=True)


def _prompts(texts: list[str], config: GenloopConfig) -> list[str]:
    """Prompts shaped like the ones drift compares against: prefixes of monitoring.drift_prefix_words."""
    low = config.monitoring.drift_prefix_words[0]
    return prompt_prefixes([text for text in texts if len(text.split()) >= low],
                           config.monitoring.drift_prefix_words, seed=1)


def fitting(prompts: list[str], model_dir: Path, room: int = ANSWER_TOKENS) -> list[str]:
    """The prompts the model in ``model_dir`` takes with ``room`` tokens left for the answer.

    The server rightly refuses a longer prompt with a 400, and the demo counts every refused
    request as a failure; 64 words of a corpus of long tokens (licence texts: URLs, hashes, e-mail
    addresses) reached 270 tokens of a 256-token context."""
    from transformers import AutoConfig, AutoTokenizer

    from genloop.training.models import context_length

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = context_length(AutoConfig.from_pretrained(model_dir)) - room
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    return [prompt for prompt, length in zip(prompts, lengths, strict=True) if length <= limit]


def _documents(source, config: GenloopConfig) -> list[str]:
    """The new domain's documents, cleaned as ingestion cleans them (so their held-out split is known)."""
    texts = [row["text"] for row in source.read(config.data).take_all() if row["text"]]
    return [text for text, reason in (clean(raw, config.data) for raw in texts) if not reason]


def _land(texts: list[str], incoming: Path, settle_s: float) -> None:
    """Write the documents into ``incoming`` as JSON lines, each file under a hidden name first and
    renamed when complete, as a producer should."""
    size = -(-len(texts) // INCOMING_PARTS)
    for part in range(INCOMING_PARTS):
        chunk = texts[part * size:(part + 1) * size]
        hidden, final = incoming / f".part-{part + 1}.jsonl", incoming / f"part-{part + 1}.jsonl"
        hidden.write_text("".join(json.dumps({"text": text}) + "\n" for text in chunk), encoding="utf-8")
        hidden.rename(final)
    time.sleep(settle_s + 0.5)  # settled: the data watch reads them now


def _drift(config: GenloopConfig, scheduler: GenloopScheduler, since: float, rows: int, console: Console) -> JobRun:
    """The scheduler's drift job over the traffic since ``since`` (the demo compresses a day into
    minutes), once the inference log holds the ``rows`` requests sent so far."""
    _wait_for_log(config, rows)
    saved = config.monitoring.drift_window
    config.monitoring.drift_window = timedelta(seconds=time.time() - since + 1)
    try:
        with scheduler.exclusive():
            scheduler.run("drift", "demo")
    finally:
        config.monitoring.drift_window = saved
    run = next(run for run in scheduler.history.recent(5) if run.job == "drift")
    console.print(f"drift job: [bold]{run.outcome}[/] — {run.detail}", highlight=False)
    return run


def _wait_for_log(config: GenloopConfig, rows: int) -> None:
    """Replicas append to the inference log in batches (serving.inference_log_flush_s): wait until it
    holds ``rows``."""
    deadline = time.time() + 60
    while len(read_inference_log(config.inference_log_dir)) < rows and time.time() < deadline:
        time.sleep(0.5)


def _show_round(config: GenloopConfig, result: RetrainResult, console: Console) -> None:
    """The training run's data, metrics and cost, the gate's verdict rule by rule, and the outcome."""
    if result.run is not None:
        run = result.run
        table = Table("metric", "value", title=f"training run {run.run_id[:8]} on {result.dataset} → v{run.version}")
        for key, value in {**run.metrics, "tokens/s": run.cost.tokens_per_second, "cost $": run.cost.cost_usd,
                           "energy kWh": run.cost.energy_kwh, "compute / v1's": run.cost.compute_ratio}.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
        if run.trials:  # a searched retrain: how its budget was spent
            kept = max(run.trials, key=lambda t: t["best_score"])
            trials = Table("trial", "replay", "peak lr", "steps run/granted", "best gate score", "",
                           title=f"search: {len(run.trials)} trials, "
                                 f"{sum(t['charged_steps'] for t in run.trials)} budget steps spent")
            for trial in run.trials:
                trials.add_row(trial["trial"], f"{trial['replay_fraction']:g}", f"{trial['learning_rate']:.2g}",
                               f"{trial['steps']}/{trial['granted_steps']}", f"{trial['best_score']:+.2%}",
                               "kept" if trial is kept else trial["stopped"].split(":")[0])
            console.print(trials)
    if result.report is not None:
        console.print(f"  gate weights: {result.report.traffic}", highlight=False)
        for rule in result.report.rules:
            console.print(f"  {'[green]pass' if rule.passed else '[red]fail'}[/] {rule.rule}: {rule.reason}")
    colour = {"promoted": "green", "rejected": "yellow"}.get(result.outcome, "default")
    report = f" (report {config.reports_dir / 'evaluations' / result.report.id}.html)" if result.report else ""
    console.print(f"[{colour}]{result.outcome}[/]: {result.detail}{report}", highlight=False)


def _summary(config: GenloopConfig, console: Console, first: RetrainResult, second: RetrainResult,
             same_drift: JobRun, new_drift: JobRun, same: Traffic, live: Traffic) -> None:
    """One table: the story in numbers, and where to read more."""
    table = Table("", "value", title="genloop demo: what happened")
    report = second.report
    if report is not None and "reference" in report.metrics:
        for label, set_name in (("old domain (docs)", "reference"), ("new domain", "current")):
            before = report.metrics[set_name]["champion"].bits_per_byte
            after = report.metrics[set_name]["candidate"].bits_per_byte
            table.add_row(f"bits/byte, {label}: v{report.champion.version} → v{report.candidate.version}",
                          f"{before:.3f} → {after:.3f} ({(after - before) / before:+.1%})")
        table.add_row("gate weights", ", ".join(f"{k} {w:.0%}" for k, w in report.weights.items()))
    for label, run in (("drift, same-domain traffic", same_drift), ("drift, after the shift", new_drift)):
        table.add_row(label, f"{run.outcome} ({run.detail.split('drifted: ')[-1].split(';')[0]})")
    table.add_row("retrain", f"{second.outcome}: {second.detail}")
    if second.run is not None and second.run.selection:  # the checkpoint the gate's question picked, and why
        table.add_row("checkpoint kept", second.run.selection)
    served = {**same.served}
    for version, count in live.served.items():
        served[version] = served.get(version, 0) + count
    table.add_row("requests served", ", ".join(f"v{v}: {n}" for v, n in sorted(served.items())))
    table.add_row("requests failed", str(len(same.failed) + len(live.failed)))
    table.add_row("inference log rows", str(len(read_inference_log(config.inference_log_dir))))
    for result in (first, second):
        if result.run is not None:
            cost = result.run.cost
            table.add_row(f"v{result.run.version} training", f"${cost.cost_usd:.5f}, {cost.energy_kwh:.5f} kWh, "
                          f"{cost.compute_ratio:.0%} of v1's compute, {result.run.metrics['steps']} steps")
    table.add_row("reports", f"{config.reports_dir}/evaluations, {config.reports_dir}/drift")
    console.print(table)
    _what_next(config, console)
    if live.failed or same.failed:
        raise DemoFailed(_failures(same, live))


def _what_next(config: GenloopConfig, console: Console) -> None:
    """Where to look and what to run after the tour, on this state folder."""
    home = "" if config.home == GenloopConfig().home else f"GENLOOP_HOME={config.home} "
    steps = Table.grid(padding=(0, 2))
    for what, how in (
        ("open the reports", f"{config.reports_dir}/evaluations/*.html and {config.reports_dir}/drift/*.html"),
        ("browse runs and models", f"mlflow ui --backend-store-uri {config.mlflow_tracking_uri}"),
        ("serve the champion", f"{home}genloop serve  (OpenAI API on http://{config.serving.host}:"
                               f"{config.serving.port}/v1)"),
        ("retrain on your data", f"{home}genloop data ingest PATH --name NAME && {home}genloop train --dataset NAME"),
        ("keep it fresh", f"{home}genloop scheduler start  (cron, drift and new files in scheduler.incoming)"),
        ("read the logs", str(log_path() or "printed above (-v)")),
    ):
        steps.add_row(f"[bold]{what}[/]", how)
    console.rule("[bold]what next")
    console.print(steps, soft_wrap=True)


def _failures(*traffic: Traffic) -> str:
    """How many requests failed, and the first few errors: what a reader needs to look into it."""
    failed = [error for sent in traffic for error in sent.failed]
    return f"{len(failed)} requests failed, first: {'; '.join(failed[:3])}" if failed else ""
