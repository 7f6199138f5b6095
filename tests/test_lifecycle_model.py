"""A model-based test of the lifecycle: hypothesis interleaves what two workers, an
operator and the clock do, on SQLite and PostgreSQL, and checks the promises after
every step (issue 13).

Workers here speak the framework's own statements (:mod:`jobrunner._queries`) step by
step, as the runners do, so any interleaving of two workers' phases, heartbeats and
crashes with cancels, reaps, retries and clock jumps can be tried. After each step:

* no execution is ``running`` without a lease, and none past its lease after a reap;
* a finished status changes only by ``retry()``;
* ``execute`` never runs again once its result was checkpointed;
* the ledger has one row per ended attempt, numbered 1..n;
* nothing waits where no claim will take it (a due time, no pending cancel).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jobrunner import _queries as q
from jobrunner._attempt import new_row, utcnow
from jobrunner._clock import db_now
from jobrunner._engine import make_sync_engine
from jobrunner._job import PhasedJob
from jobrunner._lifecycle import TERMINAL
from jobrunner._queries import Lease
from jobrunner._schema import ExecutionStatus, attempts, executions, metadata

from .conftest import Backend

E = executions.c
WORKERS = ("w1", "w2")
LEASES = {"w1": 30.0, "w2": 5.0}  # each worker's own lease length
TERMINAL_VALUES = {s.value for s in TERMINAL}


class ModelJob(PhasedJob, register=False):
    name = "model.job"

    def execute(self, loaded: Any) -> None: ...


@dataclasses.dataclass
class Held:
    """An attempt a worker believes it holds."""

    execution_id: uuid.UUID
    worker: str
    token: int
    number: int
    checkpointed: bool
    executed: bool = False


class LifecycleModel(RuleBasedStateMachine):
    """Two workers, an operator and the clock, against one real database."""

    engine: sa.Engine

    def __init__(self) -> None:
        super().__init__()
        with self.engine.begin() as conn:
            conn.execute(sa.delete(attempts))
            conn.execute(sa.delete(executions))
        self.ids: list[uuid.UUID] = []
        self.held: list[Held] = []
        self.checkpointed: set[uuid.UUID] = set()
        self.executed_after_checkpoint: list[uuid.UUID] = []
        self.last_seen: dict[uuid.UUID, str] = {}
        self.retried: set[uuid.UUID] = set()
        self.reaped_now = False

    # -- helpers ---------------------------------------------------------------------

    def _lease(self, h: Held) -> Lease:
        return Lease(execution_id=h.execution_id, worker=h.worker, token=h.token,
                     seconds=LEASES[h.worker])

    def _pick(self, items: list[Any], index: int) -> Any:
        return items[index % len(items)]

    def _drop(self, h: Held) -> None:
        if h in self.held:
            self.held.remove(h)

    def _ledger(self, h: Held, status: ExecutionStatus) -> dict[str, Any]:
        now = utcnow()
        return {"execution_id": h.execution_id, "number": h.number, "status": status.value,
                "phase": "execute", "resumed_from": "record" if h.checkpointed else "load",
                "worker": h.worker, "triggered_by": "model", "started_at": now,
                "finished_at": now}

    # -- rules: submitting and the operator ------------------------------------------------

    @rule(max_attempts=st.integers(1, 3))
    def submit(self, max_attempts: int) -> None:
        row = new_row(ModelJob, {}, execution_id=uuid.uuid4(), now=utcnow(),
                      triggered_by="model", idempotency_key=None)
        row["max_attempts"] = max_attempts
        with self.engine.begin() as conn:
            q.insert_execution(conn, row)
        self.ids.append(row["id"])

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 1000))
    def cancel(self, index: int) -> None:
        with self.engine.begin() as conn:
            q.cancel(conn, self._pick(self.ids, index))

    @precondition(lambda self: self.ids)
    @rule(index=st.integers(0, 1000))
    def retry_by_hand(self, index: int) -> None:
        eid = self._pick(self.ids, index)
        with self.engine.begin() as conn:
            current = q.get(conn, eid)
            assert current is not None
            if q.requeue(conn, eid, max_attempts=current.attempt + 2, triggered_by="model"):
                self.retried.add(eid)

    @rule()
    def reap(self) -> None:
        with self.engine.begin() as conn:
            q.reap(conn, limit=1000)
        self.reaped_now = True

    @rule(seconds=st.sampled_from([1.0, 6.0, 40.0]))
    def clock_jump(self, seconds: float) -> None:
        """Time passes: every stored deadline moves that much closer (or past)."""
        shift = sa.text(
            "UPDATE jobrunner_executions SET "
            "lease_expires_at = lease_expires_at - make_interval(secs => :s), "
            "due_at = due_at - make_interval(secs => :s)"
            if self.engine.dialect.name == "postgresql" else
            "UPDATE jobrunner_executions SET "
            "lease_expires_at = strftime('%Y-%m-%d %H:%M:%f', lease_expires_at, "
            "printf('-%f seconds', :s)) || '000', "
            "due_at = strftime('%Y-%m-%d %H:%M:%f', due_at, printf('-%f seconds', :s)) || '000'"
        )
        with self.engine.begin() as conn:
            conn.execute(shift, {"s": seconds})

    # -- rules: workers ------------------------------------------------------------------

    @rule(worker=st.sampled_from(WORKERS))
    def claim(self, worker: str) -> None:
        with self.engine.begin() as conn:
            rows = q.claim_batch(conn, worker=worker, lease_s=LEASES[worker], limit=1,
                                 jobs=[ModelJob.name])
        for row in rows:
            self.held.append(Held(row["id"], worker, row["lease_token"], row["attempt"],
                                  bool(row["checkpointed"])))

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 1000))
    def start_execute(self, index: int) -> None:
        h = self._pick(self.held, index)
        with self.engine.begin() as conn:
            answer = q.phase_started(conn, self._lease(h), {"phase": "execute"})
        if answer is None:
            self._drop(h)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 1000))
    def execute_and_checkpoint(self, index: int) -> None:
        h = self._pick(self.held, index)
        if h.checkpointed:
            return  # a resumed attempt goes straight to record
        if h.execution_id in self.checkpointed:
            self.executed_after_checkpoint.append(h.execution_id)
        h.executed = True
        with self.engine.begin() as conn:
            answer = q.checkpoint(conn, self._lease(h), {"result": 1, "checkpointed": True,
                                                         "phase": "record"})
        if answer is None:
            self._drop(h)
        else:
            h.checkpointed = True
            self.checkpointed.add(h.execution_id)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 1000))
    def execute_and_finish(self, index: int) -> None:
        """A job without record: one write stores execute's result and ends the attempt
        succeeded; with a cancel requested (or the lease gone) it does not match, and
        the plain checkpoint follows, as ``_phases._checkpoint`` does."""
        h = self._pick(self.held, index)
        if h.checkpointed:
            return
        if h.execution_id in self.checkpointed:
            self.executed_after_checkpoint.append(h.execution_id)
        h.executed = True
        values = {"result": 1, "checkpointed": True, "phase": "record"}
        with self.engine.begin() as conn:
            done = q.end_attempt(conn, self._lease(h), "done", values,
                                 self._ledger(h, ExecutionStatus.SUCCEEDED))
            answer = None if done is not None else q.checkpoint(conn, self._lease(h), values)
        if done is not None:
            assert done.status is ExecutionStatus.SUCCEEDED and not done.cancel_requested
            self.checkpointed.add(h.execution_id)
            self._drop(h)
        elif answer is None:
            self._drop(h)
        else:
            assert answer, "the finishing write refused a held, uncancelled execution"
            h.checkpointed = True
            self.checkpointed.add(h.execution_id)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 1000))
    def finish(self, index: int) -> None:
        h = self._pick(self.held, index)
        if not h.checkpointed:
            return
        with self.engine.begin() as conn:
            q.end_attempt(conn, self._lease(h), "finish", {"phase": "record"},
                          self._ledger(h, ExecutionStatus.SUCCEEDED))
        self._drop(h)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 1000), kind=st.sampled_from(["retry", "final", "interrupted"]))
    def fail(self, index: int, kind: str) -> None:
        h = self._pick(self.held, index)
        status = {"retry": "retrying", "final": "failed", "interrupted": "retrying"}[kind]
        ledger_status = (ExecutionStatus.ABANDONED if kind == "interrupted"
                         else ExecutionStatus.FAILED)
        with self.engine.begin() as conn:
            if kind == "retry":  # the runner retries only with attempts left
                row = q.get(conn, h.execution_id)
                assert row is not None
                if row.attempt >= row.max_attempts:
                    kind, status = "final", "failed"
            q.end_attempt(conn, self._lease(h), kind,  # type: ignore[arg-type]
                          {"phase": "execute", "error_type": "Boom"},
                          self._ledger(h, ledger_status), status=status, wait_s=2.0)
        self._drop(h)

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        mine = [h for h in self.held if h.worker == worker]
        with self.engine.begin() as conn:
            answer = q.heartbeat(conn, [(h.execution_id, h.token, LEASES[worker]) for h in mine])
        for h in mine:
            if h.execution_id not in answer:
                self._drop(h)

    @rule(worker=st.sampled_from(WORKERS))
    def crash(self, worker: str) -> None:
        """The worker process dies: its attempts vanish without a word."""
        self.held = [h for h in self.held if h.worker != worker]

    # -- the promises ----------------------------------------------------------------------

    @invariant()
    def promises_hold(self) -> None:
        ledger = sa.select(attempts.c.execution_id, attempts.c.number)
        with self.engine.connect() as conn:
            now = conn.execute(sa.select(db_now())).scalar_one()
            rows = conn.execute(sa.select(executions)).mappings().all()
            numbers: dict[uuid.UUID, list[int]] = {}
            for eid, number in conn.execute(ledger):
                numbers.setdefault(eid, []).append(number)
        assert self.executed_after_checkpoint == [], "execute ran again after its checkpoint"
        for row in rows:
            eid, status = row["id"], row["status"]
            if status == "running":
                assert row["lease_expires_at"] is not None, f"{eid} running without a lease"
                if self.reaped_now:
                    assert row["lease_expires_at"] >= now, f"{eid} running past its lease"
            if status in ("pending", "retrying"):
                assert row["due_at"] is not None and not row["cancel_requested"], (
                    f"{eid} is {status} but no claim will ever take it")
            assert status != "abandoned"
            before = self.last_seen.get(eid)
            if before in TERMINAL_VALUES and status != before:
                assert eid in self.retried, f"{eid} left {before} for {status} without retry"
            self.last_seen[eid] = status
            ended = row["attempt"] - (1 if status == "running" else 0)
            assert sorted(numbers.get(eid, [])) == list(range(1, ended + 1)), (
                f"{eid} ({status}, attempt {row['attempt']}) has ledger {numbers.get(eid)}")
        self.retried.clear()
        self.reaped_now = False


@pytest.fixture
def model_engine(backend: Backend, tmp_path: Path) -> Iterator[sa.Engine]:
    """The backend's database with the schema, for the model's own statements."""
    engine = make_sync_engine(backend.url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_the_lifecycle_keeps_its_promises_under_any_interleaving(
    model_engine: sa.Engine,
) -> None:
    """Two workers, cancels, reaps, retries, crashes and clock jumps: promises hold."""
    LifecycleModel.engine = model_engine
    LifecycleModel.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=40,
        deadline=None,
        database=None,  # no example database in the repository
        suppress_health_check=[HealthCheck.too_slow],
    )
    LifecycleModel.TestCase().runTest()
