"""The inference log writer: batched, partitioned by day, bounded, readable by time window."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from serving.inference_log import InferenceLog, InferenceRecord, hash_client, read_inference_log, recover_spools


def record(i: int, when: datetime | None = None, prompt: str = "hello", output: str = "world") -> InferenceRecord:
    return InferenceRecord(request_id=f"cmpl-{i}", route="completions", model_version="3", status=200,
                           prompt=f"{prompt} {i}", output=output, prompt_tokens=2, completion_tokens=1,
                           latency_seconds=0.01, **({"time": when} if when else {}))


def test_records_land_in_day_partitions_and_read_back_by_window(tmp_path: Path):
    log = InferenceLog(tmp_path, batch_rows=4, flush_seconds=0.05)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    for i in range(10):
        assert log.append(record(i, yesterday if i < 3 else None))
    log.close()

    folders = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert folders == [f"date={yesterday.date()}", f"date={datetime.now(UTC).date()}"]
    assert not list(tmp_path.rglob(".*.tmp")) and not list((tmp_path / ".spool").iterdir())  # closed: all written
    everything = read_inference_log(tmp_path)
    assert everything.num_rows == 10 and log.written == 10
    recent = read_inference_log(tmp_path, since=datetime.now(UTC) - timedelta(hours=1))
    assert sorted(recent.column("request_id").to_pylist()) == sorted(f"cmpl-{i}" for i in range(3, 10))


def test_full_buffer_drops_and_counts_instead_of_growing(tmp_path: Path):
    log = InferenceLog(tmp_path, max_buffer=5, batch_rows=1000, flush_seconds=60)
    accepted = [log.append(record(i)) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert log.dropped == 3
    log.close()
    assert read_inference_log(tmp_path).num_rows == 5


def test_log_text_covers_prompts_and_outputs(tmp_path: Path):
    from serving.inference_log import caller_prompts

    texts = {}
    for mode in ("full", "redacted", "hashed"):
        log = InferenceLog(tmp_path / mode, text=mode)
        log.append(record(1, prompt="mail me at ada@example.com,", output="or call +44 20 7946 0958 now"))
        log.close()
        row = read_inference_log(tmp_path / mode).to_pylist()[0]
        texts[mode] = (row["prompt"], row["output"], row["text_mode"])
        assert len(caller_prompts(tmp_path / mode, since=datetime(2000, 1, 1, tzinfo=UTC))) == (mode != "hashed")
    assert texts["full"] == ("mail me at ada@example.com, 1", "or call +44 20 7946 0958 now", "full")
    prompt, output, _ = texts["redacted"]
    assert "ada@example.com" not in prompt and "mail me at" in prompt and "7946" not in output
    prompt, output, _ = texts["hashed"]
    assert "mail" not in prompt and "call" not in output and "sha256:" in prompt


def test_append_is_safe_from_many_threads(tmp_path: Path):
    log = InferenceLog(tmp_path, batch_rows=50, flush_seconds=0.01)
    threads = [threading.Thread(target=lambda k=k: [log.append(record(k * 1000 + i)) for i in range(200)])
               for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    ids = read_inference_log(tmp_path).column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) == 800


def test_empty_log_reads_as_empty_table(tmp_path: Path):
    assert read_inference_log(tmp_path / "missing").num_rows == 0
    assert hash_client("key-1", "salt") == hash_client("key-1", "salt") != hash_client("key-2", "salt")
    assert hash_client("", "salt") == ""


def test_the_client_salt_is_a_private_secret_of_the_installation(genloop_config):
    import stat

    from services.serving_control import SALT_FILE, client_salt

    salt = client_salt(genloop_config)
    assert len(salt) == 64 and client_salt(genloop_config) == salt
    assert stat.S_IMODE((genloop_config.home / SALT_FILE).stat().st_mode) == 0o600
    assert hash_client("sk-key", salt) != hash_client("sk-key", "genloop")  # not the old public salt


def test_rows_a_killed_writer_had_logged_are_recovered_by_the_next_one(tmp_path: Path):
    """A replica killed outright runs no flush: its rows are in its spool, already hashed, and the
    next writer on this host writes them out, exactly once even if it dies halfway itself."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from serving.inference_log import InferenceLog, InferenceRecord\n"
        f"log = InferenceLog({str(tmp_path)!r}, flush_seconds=3600, text='hashed')\n"
        "for i in range(50):\n"
        "    log.append(InferenceRecord(request_id=f'r{i}', route='completions', model_version='1', status=200,\n"
        "                               prompt='my secret prompt', output='its answer'))\n"
        "print('logged', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert writer.stdout.readline().strip() == "logged"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert read_inference_log(tmp_path).num_rows == 0  # the buffer died with the process
    (spool,) = (tmp_path / ".spool").glob("*.jsonl")
    assert b"secret" not in spool.read_bytes() and spool.stat().st_mode & 0o077 == 0
    shutil.copy(spool, tmp_path / "copy")

    log = InferenceLog(tmp_path)  # the next writer: a restarted replica
    assert log.recovered == 50
    log.close()
    os.replace(tmp_path / "copy", spool)  # as if that writer had died between the write and the delete
    assert recover_spools(tmp_path) == 50
    rows = read_inference_log(tmp_path).to_pylist()
    assert sorted(row["request_id"] for row in rows) == sorted(f"r{i}" for i in range(50))
    assert {row["text_mode"] for row in rows} == {"hashed"} and not any("secret" in row["prompt"] for row in rows)
    assert not list((tmp_path / ".spool").iterdir())
