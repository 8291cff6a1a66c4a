"""The ``genloop`` command line: thin commands over the services modules.

Bad input (``UserInputError``, an option the config refuses, a usage error) prints one clear line
and exits with code 2; anything else is a bug and keeps its traceback. With ``--json``, a listing
prints the records the admin API serves, as JSON on stdout and nothing else there, for scripts.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from datetime import UTC, datetime, timedelta
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from rich.console import Console
from rich.table import Column, Table
from typer.core import TyperCommand

from genloop.services.config import GenloopConfig, load_config
from genloop.services.console import log_path, log_to_console, start_log
from genloop.training.errors import UserInputError

app = typer.Typer(help="genloop: keep a generative text model fresh in production.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Ingest and list datasets.", no_args_is_help=True)
scheduler_app = typer.Typer(help="Retrain on a schedule and on drift.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(scheduler_app, name="scheduler")

console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (default ./genloop.yaml).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts: the records alone on stdout, "
                                                         "anything else on stderr; same exit codes.")]
LogLevel = Literal["debug", "info", "warning", "error"]
DemoSizeName = Literal["full", "small"]  # services.demo.SIZES

_options: dict[str, Any] = {"verbose": False, "level": logging.WARNING, "command": "genloop"}


def _show_version(show: bool) -> None:
    if show:
        typer.echo(f"genloop {installed_version('genloop')}")
        raise typer.Exit()


@app.callback()
def _main_options(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Debug on the console: the libraries' and Ray's logs instead of the run's log file "
        "under $GENLOOP_HOME/logs, and genloop's own debug messages.")] = False,
    log_level: Annotated[LogLevel | None, typer.Option(
        case_sensitive=False, help="genloop's own messages shown on the console from this level up (default "
        "warning; debug with -v). The log file keeps info and up, and debug at debug.")] = None,
    _version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                           help="Print genloop's version and exit.")] = False,
) -> None:
    level = logging.getLevelNamesMapping()[(log_level or ("debug" if verbose else "warning")).upper()]
    _options.update(verbose=verbose, level=level, command=ctx.invoked_subcommand or "genloop")
    if verbose:
        log_to_console(level)


def _load(config_file: Path | None) -> GenloopConfig:
    config = load_config(config_file)
    if not _options["verbose"] and log_path() is None:
        start_log(config.home, _options["command"], level=_options["level"])
    config.check_databases()
    return config


def _override(section: BaseModel, field: str, value: object, option: str) -> None:
    """Set ``field`` of a config section from ``option`` when it was given, validated as a value in the
    config file is: a value out of range is bad input, not a traceback."""
    if value is None:
        return
    try:
        setattr(section, field, value)
    except ValidationError as exc:
        raise UserInputError(f"{option} {value}: {exc.errors()[0]['msg']}") from None


@contextmanager
def _json_mode(enabled: bool) -> Iterator[None]:
    """Under ``--json``, stdout carries the JSON alone: whatever the work prints meanwhile (a library,
    Ray under -v) goes to stderr."""
    if not enabled:
        yield
        return
    with redirect_stdout(sys.stderr):
        yield


def _print_json(records: object) -> None:
    sys.stdout.write(to_json(records, indent=2).decode() + "\n")


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM (systemd, Kubernetes, `kill`) stop long-running commands cleanly.

    SIGINT is set explicitly: a process started with it ignored (a background job of a
    non-interactive shell, some supervisors and test runners) would otherwise never drain.
    """
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


@config_app.command("show")
def config_show(config_file: ConfigOption = None) -> None:
    """Print the effective configuration (file + environment overrides) as YAML, passwords in URLs masked."""
    config = _load(config_file)
    # Plain text, not through rich: rich would wrap long values and read [brackets] as markup.
    sys.stdout.write(yaml.safe_dump(config.shown(), sort_keys=False, allow_unicode=True, width=float("inf")))


@data_app.command("ingest")
def data_ingest(
    sources: Annotated[list[str], typer.Argument(
        help="Files, folders, globs, or builtin:python-docs / builtin:python-code.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset name.")],
    config_file: ConfigOption = None,
) -> None:
    """Clean, deduplicate and split SOURCES into a new version of dataset NAME."""
    from genloop.services.cluster import connect
    from genloop.training.dataset_store import check_name
    from genloop.training.datasets import ingest

    config = _load(config_file)
    check_name(name)  # before Ray starts and the sources are read
    connect(config.ray)  # the configured Ray, not whatever Ray Data's auto-init would join
    result = ingest(sources, name, config.data, config.datasets_dir, show_progress=True)
    version = result.version
    verb = "created" if result.created else "unchanged, already"
    counts = version.manifest["counts"]
    console.print(f"{verb} {version.name}:v{version.version} at {version.path}")
    console.print(json.dumps(counts, indent=2))


@data_app.command("list")
def data_list(name: Annotated[str, typer.Argument(help="Dataset name.")], json_output: JsonOption = False,
              config_file: ConfigOption = None) -> None:
    """List the versions of dataset NAME."""
    from genloop.services.catalog import list_dataset_versions

    with _json_mode(json_output):
        rows = list_dataset_versions(_load(config_file), name)
    if json_output:
        _print_json(rows)
        return
    for row in rows:
        counts = " ".join(f"{key}={row.counts[key]}" for key in ("kept", "train", "validation") if key in row.counts)
        console.print(f"v{row.version}  {row.created_at}  {counts}  {row.content_hash[:12]}", highlight=False)


@functools.cache
def _presets_help() -> str:
    """The model presets in a line each, from their definitions, at the default vocabulary size."""
    import torch
    from transformers import AutoModelForCausalLM

    from genloop.training.config import TokenizerConfig
    from genloop.training.models import PRESETS, context_length

    vocab = TokenizerConfig().vocab_size
    lines = [f"Presets (--preset, train.preset), counted at the default vocabulary of {vocab} tokens:"]
    for name, make in PRESETS.items():
        config = make(vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        lines.append(f"  {name}: {config.model_type}, {config.num_hidden_layers} layers of {config.hidden_size}, "
                     f"{heads} heads" + (f" ({kv_heads} key/value)" if kv_heads != heads else "")
                     + f", context {context_length(config)}, {parameters / 1e6:.1f}M parameters")
    return "\n".join(lines)


class _TrainCommand(TyperCommand):
    """``genloop train``, whose help lists the presets: built when the help is shown, since reading
    the presets imports torch and transformers (seconds every other command would pay)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if not (self.help or "").endswith(_presets_help()):
            self.help = f"{self.help}\n\n{_presets_help()}"
        super().format_help(ctx, formatter)


@app.command("train", cls=_TrainCommand)
def train_command(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="NAME or NAME:vN.")],
    preset: Annotated[str | None, typer.Option(help="Model preset when training from scratch (listed above).")] = None,
    base: Annotated[str | None, typer.Option(help="Warm-start from a model folder, version or alias.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Fine-tune LoRA adapters (needs --base).")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps.")] = None,
    workers: Annotated[int | None, typer.Option(help="Override train.num_workers.")] = None,
    settings: Annotated[Path | None, typer.Option(help="Train settings `genloop tune` wrote (its `train:` "
                                                       "section over the config's).")] = None,
    config_file: ConfigOption = None,
) -> None:
    """Train a model on Ray Train and register it as a new version."""
    from genloop.services.config import load_train_settings
    from genloop.services.training_run import train

    config = _load(config_file)
    if settings is not None:
        config.train = load_train_settings(settings, config.train)
    if preset is not None and base is not None:
        raise UserInputError("--preset and --base conflict: a warm start keeps the base model's architecture")
    _override(config.train, "preset", preset, "--preset")
    if lora:
        config.train.lora.enabled = True
    _override(config.train, "max_steps", max_steps, "--max-steps")
    _override(config.train, "num_workers", workers, "--workers")
    run = train(config, dataset, base=base)
    console.print(f"registered version v{run.version} (run {run.run_id})")
    console.print(json.dumps({"metrics": run.metrics, "cost": run.cost.model_dump()}, indent=2))


@app.command("tune")
def tune_command(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="NAME or NAME:vN.")],
    base: Annotated[str | None, typer.Option(help="Tune a warm start from a model folder, version or alias.")] = None,
    preset: Annotated[list[str] | None, typer.Option(help="A preset to try besides train.preset (repeat it); "
                                                          "default tuning.presets.")] = None,
    trials: Annotated[int | None, typer.Option(help="Override tuning.trials.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Steps per trial at most (train.max_steps).")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the best settings here.")] = None,
    config_file: ConfigOption = None,
) -> None:
    """Search learning rate, warm-up, batch, weight decay and preset on Ray Tune; write the best settings
    for `genloop train --settings`."""
    from genloop.services.tuning import trials_table, tune_training

    config = _load(config_file)
    if preset and base is not None:
        raise UserInputError("--preset and --base conflict: a warm start keeps the base model's architecture")
    _override(config.tuning, "presets", preset or None, "--preset")
    _override(config.tuning, "trials", trials, "--trials")
    _override(config.train, "max_steps", max_steps, "--max-steps")
    result = tune_training(config, dataset, base=base, output=output)
    console.print(trials_table(result))
    console.print(f"validation curves: {result.plot}\ntrials: {result.report} (MLflow run {result.run_id})")
    console.print(f"best settings: {result.settings_file}\ntrain with them: genloop train --dataset {dataset} "
                  f"--settings {result.settings_file}", highlight=False)


@app.command("evaluate")
def evaluate_command(
    candidate: Annotated[str, typer.Argument(help="Candidate version (3, v3) or alias.")],
    against: Annotated[str, typer.Option(help="champion, or a version to compare with.")] = "champion",
    json_output: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Compare CANDIDATE with the champion on the same held-out sets; exit 1 when it fails the gate."""
    from genloop.services.gate import evaluate

    with _json_mode(json_output):
        config = _load(config_file)
        report = evaluate(config, candidate, against=against)
    html = config.reports_dir / "evaluations" / f"{report.id}.html"
    if json_output:  # the gate's report, as in its JSON file, and where the HTML page is
        _print_json({**report.model_dump(mode="json"), "report": str(html)})
    else:
        _print_rules(report)
        console.print(f"report: {html}")
    if not report.passed:
        raise typer.Exit(1)


def _print_rules(report) -> None:
    table = Table("rule", "result", "reason", title=f"v{report.candidate.version}: {report.verdict.upper()}")
    for rule in report.rules:
        table.add_row(rule.rule, "[green]pass" if rule.passed else "[red]fail", rule.reason)
    console.print(table)


@app.command("promote")
def promote_command(
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
    force: Annotated[bool, typer.Option("--force", help="Skip the gate (recorded; needs --reason).")] = False,
    reason: Annotated[str, typer.Option(help="Why; recorded in the audit log.")] = "",
    config_file: ConfigOption = None,
) -> None:
    """Promote VERSION to champion through the evaluation gate; exit 1 when refused."""
    from genloop.services.lifecycle import PromotionRefused, promote

    config = _load(config_file)
    try:
        report = promote(config, version, force=force, reason=reason)
    except PromotionRefused as refused:
        if refused.report is not None:
            _print_rules(refused.report)
        errors.print(f"[bold red]refused:[/] {refused}", highlight=False)
        raise typer.Exit(1) from None
    if report is not None:
        _print_rules(report)
    console.print(f"v{version.removeprefix('v')} is now the champion")


@app.command("rollback")
def rollback_command(
    reason: Annotated[str, typer.Option(help="Why; recorded in the audit log.")] = "",
    config_file: ConfigOption = None,
) -> None:
    """Move the champion back to the previous version."""
    from genloop.services.lifecycle import rollback

    roles = rollback(_load(config_file), reason=reason)
    console.print(f"champion is v{roles.champion} again (previous: v{roles.previous})")


@app.command("challenger")
def challenger_command(
    version: Annotated[str | None, typer.Argument(help="Version to shadow-serve beside the champion.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the challenger alias.")] = False,
    reason: Annotated[str, typer.Option(help="Why; recorded in the audit log.")] = "",
    config_file: ConfigOption = None,
) -> None:
    """Name VERSION the challenger: with serving.shadow_percent > 0 it answers a mirrored share of
    traffic into the inference log, never to callers."""
    from genloop.services.lifecycle import set_challenger

    if (version is None) == (not clear):
        raise UserInputError("give a VERSION or --clear")
    config = _load(config_file)
    challenger = set_challenger(config, None if clear else version, reason=reason)
    console.print(f"challenger is v{challenger}" if challenger else "challenger cleared")
    if challenger and config.serving.shadow_percent == 0:
        console.print("note: serving.shadow_percent is 0, so `genloop serve` mirrors no traffic to it")


@app.command("models")
def models_command(
    history: Annotated[bool, typer.Option("--history", help="Show the alias audit log instead.")] = False,
    json_output: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Registered versions with aliases, data, metrics, verdict and cost; or the audit log."""
    from genloop.services.audit import AuditLog
    from genloop.services.catalog import list_models

    with _json_mode(json_output):
        config = _load(config_file)
        records: list[Any] = AuditLog(config.state_db).history() if history else list_models(config)
    if json_output:  # the records GET /admin/models serves (the audit log has no route)
        _print_json(records)
        return
    if history:
        table = Table(*(Column(name, overflow="fold", no_wrap=name in ("action", "outcome")) for name in (
            "time", "actor", "action", "from", "to", "outcome", "reason", "report")))
        for entry in records:
            table.add_row(entry.at, entry.actor, entry.action, entry.from_version or "–", entry.to_version or "–",
                          entry.outcome, entry.reason, entry.report_id or "")
        console.print(table)
        return
    # Seven columns that fold rather than cut: readable at 80 columns (the full record: GET /admin/models).
    table = Table(*(Column(name, overflow="fold") for name in (
        "version", "aliases", "dataset", "val loss", "verdict", "cost $", "liked")))
    for row in records:
        table.add_row(
            f"v{row.version}", ", ".join(row.aliases), row.dataset,
            f"{row.best_val_loss:.3f}" if row.best_val_loss is not None else "–",
            row.verdict or "–", f"{row.cost_usd:.2g}" if row.cost_usd is not None else "–",
            f"{row.positive_share:.0%} of {sum(row.ratings.values())}" if row.positive_share is not None else "–",
        )
    console.print(table)


@app.command("serve")
def serve_command(
    host: Annotated[str | None, typer.Option(help="HTTP bind address (default serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default serving.port).")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to deploy onto, as `ray` commands take it (default ray.address: a local Ray).")] = None,
    config_file: ConfigOption = None,
) -> None:
    """Serve the champion over the OpenAI API and roll to each new champion; Ctrl-C or SIGTERM drains and stops."""
    import time

    from genloop.services.exporter import start_exporter
    from genloop.services.serving_control import start_serving, stop_serving

    config = _load(config_file)
    _override(config.serving, "host", host, "--host")
    _override(config.serving, "port", port, "--port")
    _override(config.ray, "address", address, "--address")
    _stop_on_signals()
    watcher = exporter = None
    try:  # Ctrl-C may come at any point, start-up included: whatever was started is stopped
        watcher = start_serving(config)  # ray.init's SIGTERM handler replaces ours; it exits through finally
        exporter = start_exporter(config)
        shadow = f", v{watcher.serving.challenger} in shadow" if watcher.serving.challenger else ""
        console.print(f"serving v{watcher.serving.champion}{shadow} at http://{config.serving.host}:"
                      f"{config.serving.port}/v1 (Ctrl-C to stop)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("draining in-flight requests…")
    finally:
        if exporter is not None:
            exporter.close()
        if watcher is not None:
            watcher.stop()
            stop_serving(own_cluster=config.ray.address is None)
    console.print("stopped")


@app.command("up")
def up_command(config_file: ConfigOption = None) -> None:
    """Run genloop as one service: serving, the scheduler, metrics and the admin API; with no champion
    it bootstraps one first. Ctrl-C or SIGTERM drains and stops."""
    from genloop.services.service import GenloopService

    service = GenloopService(_load(config_file), console)
    _stop_on_signals()
    left = None
    try:  # Ctrl-C may come at any point, start-up included: whatever was started is stopped
        service.start(after_ray=_stop_on_signals)
        service.wait()
    except KeyboardInterrupt:
        console.print("stopping: no new jobs, no admin changes…")
    finally:
        left = service.stop()
    console.print("stopped")
    if left:  # its thread is stuck in work that dies with the process; Python would wait for it
        sys.stdout.flush()
        logging.shutdown()
        os._exit(0)


@app.command("generate")
def generate_command(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="JSONL: one {\"prompt\": …} per line, "
                                             "optional id and sampling fields.")],
    output_path: Annotated[Path, typer.Option("--output", "-o", help="JSONL answers, in input order.")],
    model: Annotated[str, typer.Option(help="Version (3, v3) or alias.")] = "champion",
    max_tokens: Annotated[int, typer.Option(help="For lines that do not set max_tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="For lines that do not set temperature.")] = 1.0,
    concurrency: Annotated[int, typer.Option(help="Engines (Ray Data actors) working in parallel.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Prompts handed to an engine at once.")] = 32,
    config_file: ConfigOption = None,
) -> None:
    """Batch inference: answer every prompt of a JSONL file with the serving engine, on Ray Data."""
    from genloop.services.cluster import connect
    from genloop.services.serving_control import settings_for
    from genloop.serving.batch import generate_file

    config = _load(config_file)
    if concurrency < 1 or batch_size < 1:
        raise UserInputError("--concurrency and --batch-size must be at least 1")
    settings = settings_for(config, model)
    connect(config.ray)
    counts = generate_file(settings, input_path, output_path,
                           defaults={"max_tokens": max_tokens, "temperature": temperature},
                           concurrency=concurrency, batch_size=batch_size, replica_cpus=config.serving.replica_cpus,
                           replica_gpus=config.serving.gpus_per_replica)
    console.print(f"v{settings.model_version} answered {counts['answered']} of {counts['prompts']} prompts "
                  f"({counts['errors']} refused) into {output_path}")


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise UserInputError(f"--window {text!r}: give a number and a unit, e.g. 30m, 24h, 7d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: float(match.group(1))})


@app.command("drift")
def drift_command(
    window: Annotated[str | None, typer.Option(help="Live traffic to compare, e.g. 30m, 24h, 7d "
                                                     "(default monitoring.drift_window).")] = None,
    json_output: JsonOption = False,
    config_file: ConfigOption = None,
) -> None:
    """Compare recent prompts with the champion's training data (Evidently); HTML + JSON report."""
    from genloop.services.admin import DriftView
    from genloop.services.drift_check import drift_dir, run_drift_check

    with _json_mode(json_output):
        config = _load(config_file)
        result = run_drift_check(config, _duration(window) if window else None)
    html = drift_dir(config) / f"{result.id}.html"
    if json_output:  # what GET /admin/drift serves, with the report's file instead of its link
        _print_json(DriftView(**result.model_dump(), report=str(html)))
        return
    table = Table("feature", "method", "score", "threshold", "drifted",
                  title=f"drift vs v{result.model_version}: {result.verdict.upper()} "
                        f"({result.reference_samples} reference, {result.current_samples} current prompts)")
    for feature in result.features:
        table.add_row(feature.feature, feature.method, f"{feature.score:.4g}", f"{feature.threshold:g}",
                      "[red]yes" if feature.drifted else "[green]no")
    console.print(table)
    console.print(f"report: {html}")


@scheduler_app.command("start")
def scheduler_start(config_file: ConfigOption = None) -> None:
    """Run the retrain and drift jobs on their schedule until Ctrl-C or SIGTERM (a running job finishes first)."""
    import time

    from genloop.services.scheduler import GenloopScheduler

    scheduler = GenloopScheduler(_load(config_file))
    _stop_on_signals()
    try:
        scheduler.start()
        _print_jobs(scheduler.history.summary())
        console.print("scheduler running (Ctrl-C to stop)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping; a running job finishes first…")
    finally:
        scheduler.stop()


@scheduler_app.command("run")
def scheduler_run(
    job: Annotated[str, typer.Argument(help="retrain or drift.")],
    config_file: ConfigOption = None,
) -> None:
    """Run JOB once now, recorded in the job history; refused while a scheduler runs on the same store."""
    from genloop.services.scheduler import GenloopScheduler

    scheduler = GenloopScheduler(_load(config_file))
    if job not in scheduler.JOBS:
        raise UserInputError(f"unknown job {job!r}: {' or '.join(scheduler.JOBS)}")
    with scheduler.exclusive():
        outcome = scheduler.run(job, "manual", show_progress=True)
    console.print(f"{job}: {outcome}  ({scheduler.history.recent(1)[0].detail})")
    if outcome == "failed":
        raise typer.Exit(1)


@scheduler_app.command("status")
def scheduler_status(json_output: JsonOption = False, config_file: ConfigOption = None) -> None:
    """The jobs with their next run, and the latest runs."""
    from genloop.services.scheduler import JobHistory

    with _json_mode(json_output):
        history = JobHistory(_load(config_file).scheduler_db)
        jobs, runs = history.summary(), history.recent()
    if json_output:  # runs as GET /admin/jobs serves them; times in seconds since the epoch
        _print_json({"jobs": jobs, "runs": runs})
        return
    _print_jobs(jobs)
    table = Table("started", "job", "reason", "outcome", "seconds", "detail", title="latest runs")
    for run in runs:
        seconds = f"{run.finished_at - run.started_at:.1f}" if run.finished_at else ""
        table.add_row(_timestamp(run.started_at), run.job, run.reason, run.outcome, seconds, run.detail)
    console.print(table)


def _print_jobs(jobs: list) -> None:
    table = Table("job", "runs", "last run", "next run", title="jobs")
    for job in jobs:
        runs = ", ".join(f"{outcome} {count}" for outcome, count in sorted(job.runs.items()))
        table.add_row(job.job, runs, _timestamp(job.last_run), _timestamp(job.next_run))
    console.print(table)


def _timestamp(seconds: float | None) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else "—"


@app.command("demo")
def demo(
    size: Annotated[DemoSizeName, typer.Option(
        help="full: the tour; small: the same loop scored on fewer held-out texts (what the tests run).")
    ] = "full",
    max_steps: Annotated[int | None, typer.Option(
        min=1, help="Training steps of the first model (default: 120).")] = None,
    new_domain: Annotated[str, typer.Option(
        help="Corpus the traffic shifts to: a file, folder or glob of text data, or a builtin source.")
    ] = "builtin:python-code",
    config_file: ConfigOption = None,
) -> None:
    """The loop on a domain shift: v1 on Python's docs, same-domain traffic (no drift), then traffic and
    new documents from NEW_DOMAIN → drift → retrain with replay → gate → v2 rolled out under traffic."""
    from genloop.services.demo import SIZES, DemoFailed, run_demo

    try:
        run_demo(_load(config_file), console=console, new_domain=new_domain, size=SIZES[size],
                 max_steps=max_steps)
    except DemoFailed as exc:
        errors.print(f"[bold red]demo failed:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def main() -> None:
    # Datasets, models, logs and databases hold what users sent: readable by this user alone. Ray
    # processes genloop starts inherit it.
    os.umask(0o077)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own rich progress bars say what is happening; per-file tqdm bars only add noise.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:  # not standalone: click's errors (usage errors) come back here, to be one line like genloop's own
        code = app(standalone_mode=False)
    except _ClickException as exc:
        error: Any = exc
        if type(error).__name__ != "NoArgsIsHelpError":  # whose "message" is the help, printed already
            ctx = getattr(error, "ctx", None)
            _error(error.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
        sys.exit(error.exit_code)
    except typer.Abort:
        _error("aborted")
        sys.exit(1)
    except UserInputError as exc:
        _error(str(exc))
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


# Typer raises the exceptions of the click it runs on, since 0.2x a copy of its own: their base is
# found through the one typer exports.
_ClickException: type[Exception] = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


def _error(message: str) -> None:
    errors.print("[bold red]error:[/] ", end="")
    errors.print(message, markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
