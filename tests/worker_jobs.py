"""Jobs for the worker tests; module level so `jobrunner worker --app` imports them."""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from pydantic import BaseModel

from jobrunner import PhasedJob, RetryPolicy

worker_metadata = sa.MetaData()
events = sa.Table(
    "worker_events",
    worker_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("execution_id", sa.String(36), nullable=False),
    sa.Column("event", sa.String(20), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)


class Work(BaseModel):
    """How long execute takes."""

    seconds: float = 0.0


class Counted(PhasedJob):
    """Counts its executes (committed at once) and records (with the finish) by process."""

    name = "workers.counted"
    retry = RetryPolicy(max_attempts=3, wait_initial=0.01, jitter=0.0)
    Args = Work

    def execute(self, args: Work) -> None:
        with self.session() as session:
            session.execute(sa.insert(events).values(
                execution_id=self.execution_id, event="executed", pid=os.getpid()))
        if args.seconds:
            time.sleep(args.seconds)

    def record(self, session: sa.orm.Session, result: None) -> None:
        session.execute(sa.insert(events).values(
            execution_id=self.execution_id, event="recorded", pid=os.getpid()))
