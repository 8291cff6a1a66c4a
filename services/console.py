"""What a genloop command prints, and where everything else goes: the run's log file.

The console carries genloop's own output: rules, progress bars, tables, one line per problem. What
the libraries log (Ray, Ray Data, Ray Train, Ray Serve, MLflow, transformers, Evidently, Python's
warnings) and what Ray's processes print (workers, actors, the raylet, the GCS; Ray streams it to
the driver) goes to one file per command under ``$GENLOOP_HOME/logs/``, named once on the console.
Nothing is hidden: a library's error is shown once, in one line, with the file to read; genloop's
own warnings are shown as they are. ``--log-level`` sets how much of genloop's own logging reaches the
console; ``genloop -v`` is for debugging: no log file, every library's output and genloop's debug
messages on the console.

It works through the libraries' own switches, not by redirecting stderr: Ray's ``configure_logging``
and its driver-side log stream, Ray Data's ``DataContext``, ``MLFLOW_CONFIGURE_LOGGING``, and the
handlers each library attaches to its logger on import, which are taken back to the root logger.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

LOG_DIR = "logs"
OUR_LOGGER = "genloop"  # every module logs under logging.getLogger(__name__), inside the genloop package
# Loggers that libraries give a console handler of their own (and stop from propagating).
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic", "transformers",
                   "evidently", "py.warnings")

_log: dict[str, Any] = {}  # the running command's log: "path" and the open "stream" for Ray's lines


def log_path() -> Path | None:
    """The running command's log file; None under ``-v`` or outside the CLI."""
    return _log.get("path")


class _ConsoleHandler(logging.Handler):
    """genloop's own messages from ``own_level`` up, as they are; a library's error once, in one line,
    with the log file."""

    def __init__(self, path: Path, stream: TextIO, own_level: int):
        super().__init__()
        self.path, self.stream, self.own_level = path, stream, own_level
        self.seen: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if _ours(record):
                if record.levelno >= self.own_level:
                    self.stream.write(f"{record.levelname.lower()}: {record.getMessage()}\n")
            elif record.levelno >= logging.ERROR:
                first = (record.getMessage().strip().splitlines() or [""])[0][:200]
                if (record.name, first) not in self.seen:
                    self.seen.add((record.name, first))
                    self.stream.write(f"{record.name} reported an error: {first} (details in {self.path})\n")
        except Exception:  # noqa: BLE001 — logging must never raise into the caller
            self.handleError(record)


def _ours(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == OUR_LOGGER


def _info_or_ours(record: logging.LogRecord) -> bool:
    # Ray Data sets its logger to DEBUG for a file of its own: the libraries' debug stays out.
    return record.levelno >= logging.INFO or _ours(record)


def start_log(home: Path, command: str, level: int = logging.WARNING) -> Path:
    """Send the libraries' output to ``$GENLOOP_HOME/logs/<time>-<command>.log`` from now on; genloop's
    own messages from ``level`` up go to the console too. The file keeps info and up, whatever the
    console shows (it is what one reads after a failure), and genloop's debug messages at ``debug``."""
    folder = Path(home) / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{command.replace(' ', '-')}-{os.getpid()}.log"
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.addFilter(_info_or_ours)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [to_file, _ConsoleHandler(path, sys.stderr, level)]
    root.setLevel(logging.INFO)
    logging.getLogger(OUR_LOGGER).setLevel(min(level, logging.INFO))
    logging.captureWarnings(True)
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"  # read when mlflow is imported
    _log.update(path=path, stream=open(path, "a", encoding="utf-8", buffering=1))  # noqa: SIM115 — lives as long as the command
    take_back_library_loggers()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    return path


def log_to_console(level: int) -> None:
    """``genloop -v``: no log file, the libraries log to the console (the root logger's handler) and
    genloop's own messages from ``level`` up with them."""
    logging.getLogger(OUR_LOGGER).setLevel(level)


def take_back_library_loggers() -> None:
    """Remove the console handlers libraries attached to their loggers on import and let them
    propagate to the root logger, whose handlers are the log file and ``_ConsoleHandler``. Ray
    attaches its handlers when imported and again when ``ray.init`` configures logging, so this runs
    after each."""
    if log_path() is None:
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def route_ray_output() -> None:
    """Write what Ray's processes print (streamed to this driver) into the log file instead of the
    console. Ray has no public switch for where the driver prints them: its stream dispatcher (the
    one ``log_to_driver`` feeds) takes handlers by name, ``ray_print_logs`` being its printer, and
    its error listener calls ``print_to_stdstream``; both are Ray internals (``ray._private``),
    checked by the e2e test, which fails if either line reaches the console again."""
    stream = _log.get("stream")
    if stream is None:
        return
    from ray._private import worker as ray_worker

    def write(data: dict) -> None:
        source = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({source} pid={data.get('pid')})" if source else f"({data.get('pid')})"
        for line in data.get("lines", []):
            stream.write(f"{prefix} {line}\n")

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("genloop_log_file", write)
    # The raylet's and GCS's messages to the driver (worker start-up pressure, failed tasks) come by
    # another thread, which calls the module's printer by name.
    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: write(data)


@contextmanager
def prints_to_log() -> Iterator[None]:
    """What a library prints (rather than logs) in this process meanwhile, into the log file: Ray
    Tune prints its experiment's header (a configuration table, the results path) with ``print``
    at any verbosity. Only stdout: a progress bar meant for the console binds its file first."""
    stream = _log.get("stream")
    if stream is None:
        yield
        return
    with redirect_stdout(stream):
        yield


def announce() -> None:
    """One line naming the log file, on the console, when a command starts Ray (the point from
    which most of what it would have printed goes there)."""
    if (path := log_path()) is not None:
        sys.stderr.write(f"Ray and library logs: {path}\n")
