"""The inference log: every request, appended in batches to parquet, never blocking a response.

Requests hand a record to ``InferenceLog.append`` (a deque append: no I/O, no lock contention
worth measuring); a background thread writes batches to
``inference-log/date=YYYY-MM-DD/part-*.parquet`` (Hive-style partitions, so Ray Data, pandas
and DuckDB read a date range directly). Each file is written to a temporary name and renamed,
so a reader never sees half a file. The buffer is bounded: when the writer falls behind, new
records are dropped and counted rather than growing memory until the replica dies.
Drift detection and retraining read this log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import uuid
from collections import deque
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from services.config import LogText
from training.cleaning import scrub_pii

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
])


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


def hash_client(client: str, salt: str) -> str:
    """A stable pseudonym for a client, so traffic can be grouped without storing who it was: an HMAC
    keyed with the installation's secret salt, so whoever reads the log cannot test guessed keys."""
    return hmac.new(salt.encode(), client.encode(), hashlib.sha256).hexdigest()[:16] if client else ""


def hashed(text: str) -> str:
    """What a hashed text is stored as: its length and hash, enough to count repeats."""
    return f"[{len(text)} chars sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}]" if text else ""


def _stored(record: InferenceRecord, mode: LogText) -> dict:
    """The row as written: prompt and output kept, scrubbed or hashed as ``mode`` says."""
    row = record.model_dump()
    if mode != "full":
        keep = scrub_pii if mode == "redacted" else hashed
        row["prompt"], row["output"] = keep(row["prompt"]), keep(row["output"])
    return {**row, "text_mode": mode}


class InferenceLog:
    """Bounded, batched, asynchronous parquet writer; one per replica."""

    def __init__(self, root: Path, *, max_buffer: int = 10_000, batch_rows: int = 512,
                 flush_seconds: float = 1.0, text: LogText = "full"):
        self.root = Path(root)
        self.max_buffer = max_buffer
        self.batch_rows = batch_rows
        self.flush_seconds = flush_seconds
        self.text = text
        self.dropped = 0
        self.written = 0
        self._buffer: deque[InferenceRecord] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def append(self, record: InferenceRecord) -> bool:
        """Queue ``record``; False (and counted) when the buffer is full."""
        if len(self._buffer) >= self.max_buffer:
            self.dropped += 1
            return False
        self._buffer.append(record)
        if len(self._buffer) >= self.batch_rows:
            self._wake.set()
        return True

    def flush(self) -> None:
        """Write everything buffered now (the writer thread calls this; so does ``close``)."""
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self.batch_rows))]
            by_day: dict[date, list[InferenceRecord]] = {}
            for record in batch:
                by_day.setdefault(record.time.astimezone(UTC).date(), []).append(record)
            for day, records in by_day.items():
                self._write(day, records)

    def _write(self, day: date, records: list[InferenceRecord]) -> None:
        folder = self.root / f"date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        # Scrubbing and hashing happen here, in the writer thread, off the replica's event loop.
        table = pa.Table.from_pylist([_stored(r, self.text) for r in records], schema=SCHEMA)
        name = f"part-{datetime.now(UTC):%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, folder / name)
        self.written += len(records)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except OSError:  # a full disk must not take the replica down; the rows are lost and logged
                logger.exception("inference log write failed")

    def close(self) -> None:
        """Stop the writer and write what is left."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()


def read_inference_log(root: Path, since: datetime | None = None, until: datetime | None = None) -> pa.Table:
    """Rows of the log in [since, until), oldest first; an empty table when there is none."""
    root = Path(root)
    if not root.exists() or not any(root.glob("date=*/*.parquet")):
        return SCHEMA.empty_table()
    dataset = pads.dataset(root, format="parquet", schema=SCHEMA, partitioning="hive", exclude_invalid_files=True)
    condition = None
    if since is not None:
        condition = pads.field("time") >= pa.scalar(since.astimezone(UTC), type=SCHEMA.field("time").type)
    if until is not None:
        upper = pads.field("time") < pa.scalar(until.astimezone(UTC), type=SCHEMA.field("time").type)
        condition = upper if condition is None else condition & upper
    return dataset.to_table(filter=condition).sort_by("time")


def caller_prompts(root: Path, since: datetime, until: datetime | None = None) -> list[str]:
    """Prompts callers sent (status 200, not shadow copies, not stored as hashes) in [since, until)."""
    import pyarrow.compute as pc

    table = read_inference_log(root, since=since, until=until)
    text_kept = pc.fill_null(pc.not_equal(table["text_mode"], "hashed"), True)
    table = table.filter(pc.and_(pc.and_(pc.equal(table["status"], 200), pc.invert(table["shadow"])), text_kept))
    return [p for p in table.column("prompt").to_pylist() if p]
