"""Jobs for the fault tests; module level so worker processes import them by path."""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from pydantic import BaseModel

from jobrunner import PhasedJob, RetryPolicy

fault_metadata = sa.MetaData()
events = sa.Table(
    "fault_events",
    fault_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("execution_id", sa.String(36), nullable=False),
    sa.Column("event", sa.String(40), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


class Hold(BaseModel):
    """Which attempt stalls, where, and for how long."""

    hold_s: float = 0.0
    hold_attempt: int = 1
    hold_in: str = "execute"


class FaultJob(PhasedJob):
    """Logs each phase to fault_events (committed at once) and stalls where told."""

    name = "faults.job"
    retry = RetryPolicy(max_attempts=3, wait_initial=0.01, jitter=0.0)
    Args = Hold

    def _event(self, event: str) -> None:
        with self.session() as session:
            session.execute(sa.insert(events).values(
                execution_id=self.execution_id, event=event, attempt=self.attempt,
                pid=os.getpid(), at=time.time()))

    def _maybe_hold(self, args: Hold, where: str) -> None:
        if args.hold_in == where and self.attempt == args.hold_attempt:
            time.sleep(args.hold_s)

    def load(self, session: sa.orm.Session, args: Hold) -> Hold:
        return args

    def execute(self, args: Hold) -> dict[str, object]:
        self._event("execute-start")
        self._maybe_hold(args, "execute")
        self._event("executed")
        return {"attempt": self.attempt, "hold": args.model_dump()}

    def record(self, session: sa.orm.Session, result: dict[str, object]) -> None:
        args = Hold.model_validate(result["hold"])
        session.execute(sa.insert(events).values(
            execution_id=self.execution_id, event="recorded", attempt=self.attempt,
            pid=os.getpid(), at=time.time()))
        self._event("record-start")
        self._maybe_hold(args, "record")


class PgSleepLoad(PhasedJob):
    """Its first load waits in PostgreSQL, so a test can kill that backend mid-phase."""

    name = "faults.pg_sleep_load"
    retry = RetryPolicy(max_attempts=2, wait_initial=0.01, jitter=0.0)

    def load(self, session: sa.orm.Session, args: object) -> int:
        if self.attempt == 1:
            session.execute(sa.text("select pg_sleep(30) /* jobrunner-fault */"))
        return self.attempt

    def execute(self, attempt: int) -> int:
        return attempt


class Exclusive(PhasedJob):
    """max_concurrency=1: logs start and end so overlaps can be found afterwards."""

    name = "faults.exclusive"
    max_concurrency = 1

    def execute(self, loaded: object) -> None:
        with self.session() as session:
            session.execute(sa.insert(events).values(
                execution_id=self.execution_id, event="start", attempt=self.attempt,
                pid=os.getpid(), at=time.time()))
        time.sleep(0.03)
        with self.session() as session:
            session.execute(sa.insert(events).values(
                execution_id=self.execution_id, event="end", attempt=self.attempt,
                pid=os.getpid(), at=time.time()))


class Keyed(PhasedJob):
    """Submitted with idempotency keys from many processes."""

    name = "faults.keyed"

    def execute(self, loaded: object) -> None:
        return None
