"""The inference log: every request, appended in batches to parquet, never blocking a response.

Requests hand a record to ``InferenceLog.append``: one JSON line appended to the writer's spool
file (a single ``write`` system call, so a killed replica loses nothing it logged) and a list
append; a background thread writes batches to ``inference-log/date=YYYY-MM-DD/part-*.parquet``
(Hive-style partitions, so Ray Data, pandas and DuckDB read a date range directly). The log's root is
a folder or an object-store URI (``training.storage``): on a cluster every replica writes to, and
drift, the gate and feedback read, the same bucket. A local file is written to a temporary name and
renamed, an object in one PUT, so a reader never sees half a file. The buffer is
bounded: when the writer falls behind, new records are dropped and counted rather than growing
memory until the replica dies. Drift detection and retraining read this log.

Callers' ratings of responses (``POST /v1/feedback``) are rows of the same log, route "feedback",
under the id of the response they rate: a rating joins the completion it rates by ``request_id``,
whichever replica took either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from genloop.serving.settings import LogText
from genloop.training.cleaning import scrub_pii
from genloop.training.storage import filesystem, is_local

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("time", pa.timestamp("us", tz="UTC")),
    ("request_id", pa.string()),
    ("route", pa.string()),
    ("model_version", pa.string()),
    ("shadow", pa.bool_()),
    ("status", pa.int32()),
    ("prompt", pa.string()),
    ("output", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("latency_seconds", pa.float64()),
    ("ttft_seconds", pa.float64()),
    ("client_hash", pa.string()),
    ("text_mode", pa.string()),  # how prompt and output are stored (LogText); null in older files = full
    ("rating", pa.int8()),  # feedback rows only; null in older files
])

# The routes whose 200 rows are answers a caller got, and so may rate.
ANSWER_ROUTES = ("completions", "chat.completions")


class InferenceRecord(BaseModel):
    time: datetime = Field(default_factory=lambda: datetime.now(UTC), description="When the request arrived.")
    request_id: str = Field(description="The response id returned to the caller.")
    route: str = Field(description="completions or chat.completions.")
    model_version: str = Field(description="Registry version that answered.")
    shadow: bool = Field(False, description="True for a challenger's mirrored answer (never returned).")
    status: int = Field(description="HTTP status returned.")
    prompt: str = Field(description="The prompt as the model saw it (chat rendered through its template).")
    output: str = Field("", description="Generated text.")
    prompt_tokens: int = Field(0, description="Prompt length in tokens.")
    completion_tokens: int = Field(0, description="Generated tokens.")
    latency_seconds: float = Field(0.0, description="Arrival to last byte.")
    ttft_seconds: float | None = Field(None, description="Arrival to first token.")
    client_hash: str = Field("", description="Salted hash of the caller's key or address: joins, never identifies.")
    rating: int | None = Field(None, ge=-1, le=1, description="Feedback rows: the caller's rating of the response "
                               "``request_id`` (1 good, 0 neutral, -1 bad); the comment is the output.")


def hash_client(client: str, salt: str) -> str:
    """A stable pseudonym for a client, so traffic can be grouped without storing who it was: an HMAC
    keyed with the installation's secret salt, so whoever reads the log cannot test guessed keys."""
    return hmac.new(salt.encode(), client.encode(), hashlib.sha256).hexdigest()[:16] if client else ""


def hashed(text: str) -> str:
    """What a hashed text is stored as: its length and hash, enough to count repeats."""
    return f"[{len(text)} chars sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}]" if text else ""


def _stored(record: InferenceRecord, mode: LogText) -> InferenceRecord:
    """The record as kept: prompt and output as they are, scrubbed or hashed as ``mode`` says."""
    if mode == "full":
        return record
    keep = scrub_pii if mode == "redacted" else hashed
    return record.model_copy(update={"prompt": keep(record.prompt), "output": keep(record.output)})


SPOOL_DIR = ".spool"
SPOOL_ENV = "GENLOOP_SPOOL_DIR"


def spool_dir(root: str | Path) -> Path:
    """Where this node's writers of the log at ``root`` spool: beside a local log; for a log in object
    storage, on this node's disk (``GENLOOP_SPOOL_DIR``, default ``~/.cache/genloop/inference-spool``),
    one folder per log, where the next replica on this node finds what a killed one left."""
    if is_local(root):
        return Path(filesystem(root)[1]) / SPOOL_DIR
    base = Path(os.environ.get(SPOOL_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "genloop" / "inference-spool")
    return base / hashlib.sha256(str(root).encode()).hexdigest()[:12]


class InferenceLog:
    """Bounded, batched parquet writer with a write-ahead spool; one per replica.

    Each record is also appended, as one JSON line, to this writer's spool file with a single
    ``os.write``: once that returns the line is the kernel's, so a replica killed outright (SIGKILL,
    out of memory) loses nothing it had logged. Each flush starts a new spool file, writes the
    previous one's rows as ``part-<spool name>.parquet`` and deletes it; the next writer opened on
    the same log on this host converts the spool files of dead writers the same way. A crash
    between the parquet write and the delete only rewrites the same file: no row is lost or doubled.
    Prompts are scrubbed or hashed (``text``) before they reach the spool, so no clear text the
    operator asked not to keep touches the disk.
    """

    def __init__(self, root: str | Path, *, max_buffer: int = 10_000, batch_rows: int = 512,
                 flush_seconds: float = 1.0, text: LogText = "full"):
        self.root = str(root)
        self._store = filesystem(self.root)  # opened once: an S3 filesystem resolves its region and credentials
        self.max_buffer = max_buffer
        self.batch_rows = batch_rows
        self.flush_seconds = flush_seconds
        self.text = text
        self.dropped = 0
        self.written = 0
        self._buffer: list[InferenceRecord] = []
        self._lock = threading.Lock()  # one spool file and its buffer change together
        self.spool_dir = spool_dir(self.root)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.recovered = recover_spools(self.root)
        self._spool = self._new_spool()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def _new_spool(self) -> tuple[int, Path]:
        path = self.spool_dir / f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:12]}.jsonl"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), path

    def append(self, record: InferenceRecord) -> bool:
        """Spool and queue ``record``; False (and counted) when the buffer is full."""
        kept = _stored(record, self.text)
        line = json.dumps({**kept.model_dump(mode="json"), "text_mode": self.text}).encode() + b"\n"
        with self._lock:
            if len(self._buffer) >= self.max_buffer:
                self.dropped += 1
                return False
            os.write(self._spool[0], line)
            self._buffer.append(kept)
            queued = len(self._buffer)
        if queued >= self.batch_rows:
            self._wake.set()
        return True

    def flush(self) -> None:
        """Write everything spooled so far (the writer thread calls this; so does ``close``)."""
        with self._lock:
            if not self._buffer:
                return
            records, self._buffer = self._buffer, []
            (fd, path), self._spool = self._spool, self._new_spool()
        os.close(fd)
        self.written += _write_parquet(self._store, path.stem, records, self.text)
        path.unlink()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except OSError:  # a full disk must not take the replica down; the spool keeps the rows
                logger.exception("inference log write failed")

    def close(self) -> None:
        """Stop the writer, write what is left, remove the (empty) spool file."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()
        with self._lock:
            fd, path = self._spool
            if not self._buffer:
                os.close(fd)
                path.unlink(missing_ok=True)


def _write_parquet(store: tuple[pafs.FileSystem, str], name: str, records: list[InferenceRecord],
                   text: LogText) -> int:
    """``records`` as ``date=…/part-<name>.parquet`` under ``store`` (a filesystem and the log's root in
    it), one file per day, whole or not at all (a local file under a hidden name then renamed, an
    object in one PUT), so a reader never sees half a file and a rewrite replaces it whole."""
    fs, base = store
    local = isinstance(fs, pafs.LocalFileSystem)
    by_day: dict[date, list[dict]] = {}
    for record in records:
        by_day.setdefault(record.time.astimezone(UTC).date(), []).append({**record.model_dump(), "text_mode": text})
    for day, rows in by_day.items():
        folder = f"{base}/date={day.isoformat()}"
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        if local:  # an object store has no folders to make (pyarrow would write empty marker objects)
            fs.create_dir(folder, recursive=True)
            tmp = f"{folder}/.part-{name}.parquet.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, f"{folder}/part-{name}.parquet")
        else:
            pq.write_table(table, f"{folder}/part-{name}.parquet", filesystem=fs)
    return len(records)


def recover_spools(root: str | Path) -> int:
    """Convert the spool files that writers on this host left when they died into parquet; the
    number of rows recovered. A last line cut short by the kill is skipped (its write never
    returned, so no request counted on it)."""
    host, recovered, store = socket.gethostname(), 0, None
    for path in sorted(spool_dir(root).glob(f"{host}_*.jsonl")):
        pid = path.stem.split("_")[1]
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        records = []
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line)
                records.append((InferenceRecord.model_validate(row), row.get("text_mode", "full")))
            except ValueError:
                continue
        # One spool holds one writer's rows, all in one text mode.
        if records:
            store = store or filesystem(root)
            recovered += _write_parquet(store, path.stem, [r for r, _ in records], records[0][1])
        path.unlink()
    if recovered:
        logger.warning("inference log: recovered %d rows that a killed replica had spooled", recovered)
    return recovered


def _dataset(root: str | Path) -> pads.Dataset | None:
    """The log as one dataset read with ``SCHEMA``, so files written before a column existed read it as
    null; None when nothing has been written yet."""
    fs, base = filesystem(root)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return None
    dataset = pads.dataset(base, filesystem=fs, format="parquet", schema=SCHEMA, partitioning="hive",
                           exclude_invalid_files=True)
    return dataset if dataset.files else None


def read_inference_log(root: str | Path, since: datetime | None = None, until: datetime | None = None) -> pa.Table:
    """Rows of the log in [since, until), oldest first; an empty table when there is none."""
    dataset = _dataset(root)
    if dataset is None:
        return SCHEMA.empty_table()
    condition = None
    if since is not None:
        condition = pads.field("time") >= pa.scalar(since.astimezone(UTC), type=SCHEMA.field("time").type)
    if until is not None:
        upper = pads.field("time") < pa.scalar(until.astimezone(UTC), type=SCHEMA.field("time").type)
        condition = upper if condition is None else condition & upper
    return dataset.to_table(filter=condition).sort_by("time")


def caller_prompts(root: str | Path, since: datetime, until: datetime | None = None) -> list[str]:
    """Prompts callers sent (status 200, not shadow copies, not stored as hashes) in [since, until).

    Feedback rows carry no prompt, so they are never among them."""
    import pyarrow.compute as pc

    table = read_inference_log(root, since=since, until=until)
    text_kept = pc.fill_null(pc.not_equal(table["text_mode"], "hashed"), True)
    table = table.filter(pc.and_(pc.and_(pc.equal(table["status"], 200), pc.invert(table["shadow"])), text_kept))
    return [p for p in table.column("prompt").to_pylist() if p]


def _latest_ratings(dataset: pads.Dataset) -> pa.Table:
    """``request_id``, ``rating``: each rated response once, with its latest rating (a caller may
    change their mind)."""
    rows = dataset.to_table(columns=["time", "request_id", "rating"], filter=(
        (pads.field("route") == "feedback") & (pads.field("status") == 200) & pads.field("rating").is_valid()))
    return (rows.sort_by("time").group_by("request_id", use_threads=False)
            .aggregate([("rating", "last")]).rename_columns(["request_id", "rating"]))


def _answers(dataset: pads.Dataset, ids: pa.Array, columns: list[str], text_kept: bool = False) -> pa.Table:
    """The rows of answered responses among ``ids`` that callers got (status 200, not shadow copies):
    ``columns`` of each; with ``text_kept``, only those whose text was not stored as a hash."""
    condition = (pads.field("request_id").isin(ids) & pads.field("route").isin(list(ANSWER_ROUTES))
                 & (pads.field("status") == 200) & ~pads.field("shadow"))
    if text_kept:
        condition &= pads.field("text_mode").is_null() | (pads.field("text_mode") != "hashed")
    return dataset.to_table(columns=columns, filter=condition)


def feedback_by_version(root: str | Path) -> dict[str, dict[int, int]]:
    """Model version → rating → responses rated so: each rated response counted once, at its latest
    rating, under the version that answered it. Ratings of ids the log holds no answer for (never
    answered, or answered before the log began) are not counted."""
    dataset = _dataset(root)
    if dataset is None:
        return {}
    ratings = _latest_ratings(dataset)
    if not ratings.num_rows:
        return {}
    # A response of n choices is n rows of one version: one per response.
    versions = (_answers(dataset, ratings["request_id"].combine_chunks(), ["request_id", "model_version"])
                .group_by(["request_id", "model_version"]).aggregate([]))
    counts = (ratings.join(versions, "request_id", join_type="inner")
              .group_by(["model_version", "rating"]).aggregate([("request_id", "count")]))
    result: dict[str, dict[int, int]] = {}
    for row in counts.to_pylist():
        result.setdefault(row["model_version"], {})[row["rating"]] = row["request_id_count"]
    return result


def rated_completions(root: str | Path, min_rating: int) -> list[str]:
    """Answers rated at least ``min_rating`` (at their latest rating) as training texts: each choice's
    prompt followed by its output, oldest first. Answers whose text the log keeps only as a hash
    have none to train on and are left out."""
    dataset = _dataset(root)
    if dataset is None:
        return []
    ratings = _latest_ratings(dataset)
    liked = ratings.filter(pads.field("rating") >= min_rating)["request_id"].combine_chunks()
    if not len(liked):
        return []
    rows = _answers(dataset, liked, ["time", "prompt", "output"], text_kept=True).sort_by("time")
    pairs = zip(rows["prompt"].to_pylist(), rows["output"].to_pylist(), strict=True)
    return [prompt + output for prompt, output in pairs]
