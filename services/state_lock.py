"""Exclusive locks on a piece of genloop's state, held for a process's life: one ``genloop up`` per
state, one scheduler per job store.

Where the state lives in PostgreSQL, the lock is a session-level advisory lock in that database
(``pg_try_advisory_lock``), so it holds across hosts: two control planes started on two machines
against one database are refused just as two on one machine are. It is released when the holding
connection closes, including when its process dies or its host drops off the network (TCP
keepalives notice within about 25 s). Elsewhere (SQLite, the embedded default) the state is a file
on one machine, and so is the lock: ``flock`` on a file beside it, released by the kernel when the
process dies. Either way the holder is named in the refusal: PostgreSQL's ``application_name`` of
the holding session, or the pid written into the lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import IO

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

# libpq's TCP keepalives on the holding session: a holder whose host vanished (no FIN, no RST) loses
# the lock after idle + interval x count seconds instead of the kernel's two hours.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

# The holder of an advisory lock on a bigint key: pg_locks splits the key into two 32-bit halves.
_HOLDER = text("""
    SELECT activity.application_name, host(activity.client_addr) FROM pg_locks AS locks
    JOIN pg_stat_activity AS activity ON activity.pid = locks.pid
    WHERE locks.locktype = 'advisory' AND locks.granted AND locks.objsubid = 1
      AND locks.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((locks.classid::bigint << 32) | locks.objid::bigint) = :key
""")


class LockHeld(RuntimeError):
    """Another process holds the lock; the message names it as well as the lock can tell."""


def is_postgresql(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def lock_key(name: str) -> int:
    """A stable, positive 63-bit advisory-lock key for ``name`` (the same on every host and run)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") & (2**63 - 1)


class StateLock:
    """An exclusive lock named ``name`` on the state at ``url``, taken at once or refused with
    ``LockHeld``; ``file`` is the lock file used where the state is not in PostgreSQL."""

    def __init__(self, url: str, name: str, file: Path):
        self.name = name
        self._connection: Connection | None = None
        self._file: IO[str] | None = None
        if is_postgresql(url):
            self._take_advisory(url)
        else:
            self._take_file(file)

    def _take_advisory(self, url: str) -> None:
        owner = f"genloop {self.name}, pid {os.getpid()} on {socket.gethostname()}"[:63]  # NAMEDATALEN - 1
        engine = create_engine(url, poolclass=NullPool,
                               connect_args={"application_name": owner, **_KEEPALIVES})
        # Autocommit: the lock belongs to the session, and an open transaction held for days would
        # keep VACUUM from reclaiming anything newer than its start.
        connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        key = lock_key(self.name)
        if not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
            holder = connection.execute(_HOLDER, {"key": key}).first()
            connection.close()
            where = f" from {holder[1]}" if holder is not None and holder[1] else ""
            raise LockHeld(f"{holder[0] or 'another session'}{where}" if holder is not None else "another session")
        self._connection = connection

    def _take_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise LockHeld(f"pid {owner}, lock file {path}") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def close(self) -> None:
        """Release the lock (closing the session releases an advisory lock)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._file is not None:
            self._file.close()
            self._file = None
