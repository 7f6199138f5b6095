"""Helpers for testing code that runs on jobrunner.

:class:`InvariantChecker` checks what must hold in an execution store whatever crashes:
no execution is ``running`` without a live lease, a terminal status never changes
except through an explicit retry, every attempt is in the ledger, and a succeeded
execution has its checkpoint. Call :meth:`InvariantChecker.check` as often as you like
(e.g. while fault-injecting); it remembers what it saw between calls.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from ._clock import db_now
from ._engine import is_memory_sqlite, make_sync_engine, parse_url
from ._exceptions import ConfigurationError
from ._lifecycle import WAITING
from ._schema import TERMINAL_STATUSES, ExecutionStatus, attempts, executions

__all__ = ["InvariantChecker"]


@dataclasses.dataclass(frozen=True, slots=True)
class _Seen:
    status: str
    attempt: int
    max_attempts: int
    triggered_by: str


class InvariantChecker:
    """Checks the execution store at ``database_url`` for broken invariants."""

    def __init__(
        self, database_url: str | URL | sa.Engine, *, reap_grace: float | None = 30.0
    ) -> None:
        """Check the store at ``database_url``, or on ``engine`` (e.g. ``runner.engine``).

        An in-memory SQLite database is private to the engine that made it: pass that
        runner's ``engine`` rather than the URL.
        """
        self.reap_grace = reap_grace
        self._seen: dict[uuid.UUID, _Seen] = {}
        self._owned = not isinstance(database_url, sa.Engine)
        if isinstance(database_url, sa.Engine):
            self._engine = database_url
            return
        if is_memory_sqlite(parse_url(database_url, is_async=False)):
            raise ConfigurationError(
                f"InvariantChecker({str(database_url)!r}): an in-memory SQLite database is "
                "private to the engine that made it, so a checker with its own engine would "
                "see an empty database; pass the runner's engine instead "
                "(InvariantChecker(runner.engine)), or use a file"
            )
        self._engine = make_sync_engine(database_url, poolclass=sa.pool.NullPool)

    def check(self) -> list[str]:
        """Every violation found now (and since the last call), as readable lines."""
        # One statement, so the rows and their ledger counts come from one snapshot.
        ledger_rows = (
            sa.select(sa.func.count())
            .where(attempts.c.execution_id == executions.c.id)
            .scalar_subquery()
            .label("ledger_rows")
        )
        with self._engine.connect() as conn:
            rows = (
                conn.execute(sa.select(executions, ledger_rows, db_now().label("db_now")))
                .mappings()
                .all()
            )
        problems: list[str] = []
        for row in rows:
            problems.extend(self._check_row(row, row["ledger_rows"], row["db_now"]))
        return problems

    def assert_ok(self) -> None:
        """Raise AssertionError listing every violation, if there is any."""
        problems = self.check()
        assert not problems, "jobrunner invariants broken:\n" + "\n".join(problems)

    def close(self) -> None:
        """Release the checker's database engine."""
        if self._owned:
            self._engine.dispose()

    def _check_row(self, row: sa.RowMapping, ledger_rows: int, now: datetime) -> list[str]:
        eid, status = row["id"], row["status"]
        problems = self._lease_problems(row, now)
        seen = self._seen.get(eid)
        if seen is not None and seen.status in TERMINAL_STATUSES and status != seen.status:
            now_seen = (row["attempt"], row["max_attempts"], row["triggered_by"])
            retried = now_seen != (seen.attempt, seen.max_attempts, seen.triggered_by)
            if not retried:
                problems.append(
                    f"{eid} changed from terminal {seen.status} to {status} without a retry"
                )
        self._seen[eid] = _Seen(status, row["attempt"], row["max_attempts"], row["triggered_by"])
        expected = row["attempt"] - (1 if status == ExecutionStatus.RUNNING else 0)
        if ledger_rows != expected:
            problems.append(
                f"{eid} ({status}) has {ledger_rows} ledger rows for {row['attempt']} attempts"
            )
        if status == ExecutionStatus.SUCCEEDED and not (row["checkpointed"] and row["finished_at"]):
            problems.append(f"{eid} succeeded without a checkpoint or a finish time")
        if status in WAITING and (row["cancel_requested"] or row["due_at"] is None):
            problems.append(
                f"{eid} is {status} but no claim will ever take it "
                f"(cancel_requested={row['cancel_requested']}, due_at={row['due_at']})"
            )
        if status not in {s.value for s in ExecutionStatus} or status == "abandoned":
            problems.append(f"{eid} has status {status!r}, which no transition leads to")
        return problems

    def _lease_problems(self, row: Any, now: datetime) -> list[str]:
        if row["status"] != ExecutionStatus.RUNNING:
            return []
        expires = row["lease_expires_at"]
        if expires is None:
            return [f"{row['id']} is running without a lease"]
        if self.reap_grace is not None and expires + timedelta(seconds=self.reap_grace) < now:
            return [
                f"{row['id']} is running on a lease that expired at {expires} "
                f"(more than {self.reap_grace:g}s ago: nobody reaps it)"
            ]
        return []
