"""The inference log writer: batched, partitioned by day, bounded, readable by time window."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from genloop.serving.inference_log import InferenceLog, InferenceRecord, hash_client, read_inference_log, recover_spools


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
    from genloop.serving.inference_log import caller_prompts

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

    from genloop.services.serving_control import SALT_FILE, client_salt

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


def _answer(response_id: str, version: str, *, prompt: str = "p", output: str = "o", status: int = 200,
            shadow: bool = False, route: str = "completions", when: datetime | None = None) -> InferenceRecord:
    return InferenceRecord(request_id=response_id, route=route, model_version=version, shadow=shadow, status=status,
                           prompt=prompt, output=output, **({"time": when} if when else {}))


def _rating(response_id: str, rating: int, when: datetime) -> InferenceRecord:
    return InferenceRecord(request_id=response_id, route="feedback", model_version="", status=200, prompt="",
                           output="a comment", rating=rating, time=when)


def test_feedback_joins_each_responses_latest_rating_to_the_version_that_answered(tmp_path: Path):
    from genloop.serving.inference_log import caller_prompts, feedback_by_version

    start = datetime.now(UTC) - timedelta(minutes=10)
    log = InferenceLog(tmp_path)
    for record in (
        _answer("cmpl-a", "1"), _answer("cmpl-a", "1"),  # two choices of one response: rated once
        _answer("cmpl-b", "1"), _answer("chatcmpl-c", "2", route="chat.completions"),
        _answer("cmpl-d", "2", status=429), _answer("cmpl-d", "3", shadow=True),  # refused; a shadow's copy
        _rating("cmpl-a", -1, start), _rating("cmpl-a", 1, start + timedelta(minutes=1)),  # changed their mind
        _rating("cmpl-b", 0, start + timedelta(minutes=2)), _rating("chatcmpl-c", -1, start),
        _rating("cmpl-d", 1, start), _rating("cmpl-unknown", 1, start),
    ):
        log.append(record)
    log.close()
    assert feedback_by_version(tmp_path) == {"1": {1: 1, 0: 1}, "2": {-1: 1}}
    # Rating rows are no caller's prompts: drift and the gate's live set never see them.
    assert sorted(caller_prompts(tmp_path, since=start - timedelta(days=1))) == ["p"] * 4
    assert feedback_by_version(tmp_path / "missing") == {}


def test_a_log_written_before_ratings_existed_still_reads(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genloop.serving.inference_log import SCHEMA, feedback_by_version, rated_completions

    old = pa.schema([field for field in SCHEMA if field.name not in ("rating", "text_mode")])
    folder = tmp_path / f"date={datetime.now(UTC).date()}"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{**_answer("cmpl-old", "1").model_dump()}], schema=old),
                   folder / "part-old.parquet")
    log = InferenceLog(tmp_path)
    log.append(_rating("cmpl-old", 1, datetime.now(UTC)))
    log.close()
    assert read_inference_log(tmp_path).column("rating").to_pylist() == [None, 1]
    assert feedback_by_version(tmp_path) == {"1": {1: 1}}
    assert rated_completions(tmp_path, 1) == ["po"]


def test_rated_completions_are_training_texts_of_answers_rated_well_enough(tmp_path: Path):
    from genloop.serving.inference_log import rated_completions

    start = datetime.now(UTC) - timedelta(minutes=10)
    log = InferenceLog(tmp_path / "full")
    for record in (
        _answer("cmpl-good", "1", prompt="The loop ", output="ends.", when=start),
        _answer("chatcmpl-ok", "1", prompt="<user>Hi", output=" there", when=start + timedelta(minutes=1)),
        _answer("cmpl-bad", "1", prompt="Bad ", output="answer"),
        _answer("cmpl-shadow", "2", prompt="Shadow ", output="copy", shadow=True),
        _answer("cmpl-rerated", "1", prompt="Rerated ", output="down"),
        _rating("cmpl-good", 1, start), _rating("chatcmpl-ok", 0, start), _rating("cmpl-bad", -1, start),
        _rating("cmpl-shadow", 1, start),
        _rating("cmpl-rerated", 1, start), _rating("cmpl-rerated", -1, start + timedelta(minutes=1)),
    ):
        log.append(record)
    log.close()
    assert rated_completions(tmp_path / "full", 1) == ["The loop ends."]
    assert rated_completions(tmp_path / "full", 0) == ["The loop ends.", "<user>Hi there"]

    hashed = InferenceLog(tmp_path / "hashed", text="hashed")
    hashed.append(_answer("cmpl-good", "1", prompt="secret ", output="text"))
    hashed.append(_rating("cmpl-good", 1, start))
    hashed.close()
    assert rated_completions(tmp_path / "hashed", 1) == []
