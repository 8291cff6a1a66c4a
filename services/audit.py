"""The promotion audit log, and the lock that makes alias changes atomic to every reader.

Promotion moves two aliases (``previous`` then ``champion``) with two MLflow calls. To keep
readers from seeing the pair half-moved, and two promotions from interleaving, every alias change
runs inside ``AuditLog.exclusive()`` and every reader of the pair inside ``AuditLog.shared()``:
a database-level readers-writer lock (SQLite ``BEGIN EXCLUSIVE`` against ``BEGIN`` + read;
``SELECT … FOR UPDATE`` / ``FOR SHARE`` on other databases), so it holds across processes.
The audit row is written in the same transaction as the change it records.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, insert, select
from sqlalchemy.engine import Connection

metadata = MetaData()
alias_audit = Table(
    "alias_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(40), nullable=False),
    Column("from_version", String(40)),
    Column("to_version", String(40)),
    Column("reason", String(2000), nullable=False, default=""),
    Column("report_id", String(100)),
    Column("outcome", String(40), nullable=False),
)
lifecycle_lock = Table("lifecycle_lock", metadata, Column("id", Integer, primary_key=True))


class AuditEntry(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    from_version: str | None
    to_version: str | None
    reason: str
    report_id: str | None
    outcome: str


class AuditLog:
    def __init__(self, url: str):
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, connect_args={"timeout": 60} if self.sqlite else {})
        if self.sqlite:
            # pysqlite opens transactions lazily and never exclusively; take over BEGIN ourselves.
            @event.listens_for(self.engine, "connect")
            def _no_implicit_begin(dbapi_connection, _record) -> None:
                dbapi_connection.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _begin(connection: Connection) -> None:
                connection.exec_driver_sql("BEGIN EXCLUSIVE" if connection.info.get("exclusive") else "BEGIN")

        metadata.create_all(self.engine)
        with self.engine.begin() as connection:
            if connection.execute(select(lifecycle_lock.c.id)).first() is None:
                connection.execute(insert(lifecycle_lock).values(id=1))

    @contextmanager
    def _transaction(self, exclusive: bool) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            connection.info["exclusive"] = exclusive
            try:
                with connection.begin():
                    query = select(lifecycle_lock.c.id)
                    if not self.sqlite:
                        query = query.with_for_update(read=not exclusive)
                    connection.execute(query).first()  # takes the lock (SHARED on SQLite)
                    yield connection
            finally:
                connection.info.pop("exclusive", None)

    @contextmanager
    def exclusive(self) -> Iterator[Connection]:
        """Serialise alias changes; readers in ``shared()`` wait until the change commits."""
        with self._transaction(exclusive=True) as connection:
            yield connection

    @contextmanager
    def shared(self) -> Iterator[Connection]:
        """Read aliases knowing no change is half-done."""
        with self._transaction(exclusive=False) as connection:
            yield connection

    def record(
        self,
        connection: Connection,
        *,
        actor: str,
        action: str,
        from_version: str | None,
        to_version: str | None,
        outcome: str,
        reason: str = "",
        report_id: str | None = None,
    ) -> None:
        connection.execute(insert(alias_audit).values(
            at=datetime.now(UTC).isoformat(timespec="seconds"), actor=actor, action=action,
            from_version=from_version, to_version=to_version, reason=reason, report_id=report_id, outcome=outcome,
        ))

    def history(self) -> list[AuditEntry]:
        """Every recorded alias change and refusal, oldest first."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(alias_audit).order_by(alias_audit.c.id)).mappings().all()
        return [AuditEntry(**row) for row in rows]
