"""A real PostgreSQL restarted under running executions, on both runners.

The server is a throwaway cluster the test starts, stops and starts again (``pg_ctl -m
fast``: every session is ended, as in a restart or a failover). Executions are in their
execute phase when it goes down; the test then checks what the operator cares about:
every execution ends as its retry policy says, none is left ``running`` or ``retrying``
with no way forward, and nothing outside jobrunner's error tree reaches the caller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

import jobrunner
from jobrunner import AsyncJobRunner, JobRunner, PhasedJob, Registry, RetryPolicy

from ._services import Cluster, scratch_database, throwaway_cluster, wait_for

N = 10
CONCURRENCY = 4
#: The policy of a job that should survive the database blinking.
POLICY = RetryPolicy(max_attempts=6, wait_initial=0.05, multiplier=1.0, jitter=0.0)


class Gate:
    """Executes wait here, so the test knows they are in flight when it restarts."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.open = threading.Event()

    def enter(self) -> None:
        self.started.release()
        assert self.open.wait(120), "the test never opened the gate"


GATE = Gate()
ECHO = sa.text("SELECT CAST(:n AS integer)")


class Blink(PhasedJob):
    """Reads in load, waits in execute, writes in record: a phase on each side."""

    name = "restart.blink"
    retry = POLICY

    class Args(BaseModel):
        n: int

    def load(self, session: Any, args: Args) -> int:
        return int(session.execute(ECHO, {"n": args.n}).scalar_one())

    def execute(self, loaded: int) -> int:
        GATE.enter()
        return loaded * 2

    def record(self, session: Any, result: int) -> None:
        session.execute(sa.text("SELECT CAST(:r AS integer)"), {"r": result})


class AsyncBlink(PhasedJob):
    name = "restart.async_blink"
    retry = POLICY

    class Args(BaseModel):
        n: int

    async def load(self, session: Any, args: Args) -> int:
        return int((await session.execute(ECHO, {"n": args.n})).scalar_one())

    async def execute(self, loaded: int) -> int:
        await asyncio.to_thread(GATE.enter)
        return loaded * 2

    async def record(self, session: Any, result: int) -> None:
        await session.execute(sa.text("SELECT CAST(:r AS integer)"), {"r": result})


class Quick(PhasedJob):
    """No gate: warms a runner's pool, so its connections are stale after the restart."""

    name = "restart.quick"

    def load(self, session: Any, args: Any) -> int:
        return int(session.execute(sa.text("SELECT 1")).scalar_one())

    def execute(self, loaded: int) -> int:
        return loaded


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with throwaway_cluster() as found:
        if found is None:
            if os.environ.get("JOBRUNNER_REQUIRE_POSTGRES", "") not in ("", "0"):
                pytest.fail("JOBRUNNER_REQUIRE_POSTGRES=1 but initdb/pg_ctl are missing")
            pytest.skip("no initdb/pg_ctl: cannot start a PostgreSQL of the test's own")
        yield found


@pytest.fixture
def url(cluster: Cluster) -> Iterator[str]:
    with scratch_database(cluster.url) as db:
        rendered = db.render_as_string(hide_password=False)
        jobrunner.migrate(rendered)
        yield rendered


@pytest.fixture(autouse=True)
def fresh_gate() -> None:
    global GATE
    GATE = Gate()


def _registry() -> Registry:
    registry = Registry()
    registry.register(Blink)
    registry.register(AsyncBlink)
    registry.register(Quick)
    return registry


def _restart_while_in_flight(cluster: Cluster, in_flight: int) -> None:
    for _ in range(in_flight):
        assert GATE.started.acquire(timeout=120), "executions never reached execute"
    cluster.stop("fast")
    cluster.start()
    GATE.open.set()


def _assert_all_ended(runner: JobRunner, ids: list[Any]) -> None:
    ended = [runner.get(eid) for eid in ids]
    assert {e.status.value for e in ended} == {"succeeded"}, [
        (e.status.value, e.error_type, e.error_message) for e in ended
    ]
    assert sorted(e.result for e in ended) == sorted(2 * n for n in range(N))
    # every execute that returned was checkpointed and never ran again after it
    for execution in ended:
        assert execution.checkpointed


def test_a_sync_worker_survives_a_restart(cluster: Cluster, url: str) -> None:
    with JobRunner(url, registry=_registry(), heartbeat_interval=0.5) as runner:
        ids = [runner.submit(Blink, {"n": n}) for n in range(N)]
        errors: list[BaseException] = []

        def work() -> None:
            try:
                runner.work(concurrency=CONCURRENCY, poll_interval=0.05, reap_interval=0.5)
            except BaseException as exc:  # the test fails on it below
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        try:
            _restart_while_in_flight(cluster, CONCURRENCY)
            wait_for(
                lambda: all(runner.get(eid).status.is_terminal for eid in ids),
                "every execution to end after the restart",
            )
        finally:
            GATE.open.set()
            runner.stop_work()
            thread.join()
        assert errors == []
        _assert_all_ended(runner, ids)


def test_an_async_worker_survives_a_restart(cluster: Cluster, url: str) -> None:
    async def main() -> list[Any]:
        async with AsyncJobRunner(url, registry=_registry(), heartbeat_interval=0.5) as runner:
            ids = [await runner.submit(AsyncBlink, {"n": n}) for n in range(N)]
            worker = asyncio.create_task(
                runner.work(concurrency=CONCURRENCY, poll_interval=0.05, reap_interval=0.5)
            )
            await asyncio.to_thread(_restart_while_in_flight, cluster, CONCURRENCY)
            for _ in range(2400):
                ended = [await runner.get(eid) for eid in ids]
                if all(e.status.is_terminal for e in ended) or worker.done():
                    break
                await asyncio.sleep(0.05)
            runner.stop_work()
            await worker  # raises what the worker raised
            return ids

    ids = asyncio.run(main())
    with JobRunner(url, registry=_registry()) as runner:
        _assert_all_ended(runner, ids)


@pytest.mark.parametrize("runner_kind", ["sync", "async"])
def test_an_inline_run_survives_a_restart_during_execute(
    cluster: Cluster, url: str, runner_kind: str
) -> None:
    """run() in execute while the server restarts: checkpoint and record reconnect."""
    restarter = threading.Thread(target=_restart_while_in_flight, args=(cluster, 1))
    restarter.start()
    try:
        if runner_kind == "sync":
            with JobRunner(url, registry=_registry()) as runner:
                runner.run(Quick)  # warm the pool: these connections go stale
                execution = runner.run(Blink, {"n": 21})
        else:

            async def main() -> Any:
                async with AsyncJobRunner(url, registry=_registry()) as runner:
                    await runner.run(Quick)
                    return await runner.run(AsyncBlink, {"n": 21})

            execution = asyncio.run(main())
    finally:
        GATE.open.set()
        restarter.join()
    assert execution.status.value == "succeeded", (execution.error_type, execution.error_message)
    assert execution.result == 42
    assert execution.attempt == 1


class _Lost(logging.Handler):
    """Counts the worker's 'could not write to the database' records, as they happen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Semaphore(0)

    def emit(self, record: logging.LogRecord) -> None:
        if "could not write to the database" in record.getMessage():
            self.seen.release()


def test_executions_whose_writes_fail_in_an_outage_are_reaped_and_retried(
    cluster: Cluster, url: str
) -> None:
    """The server is down when executes return: their checkpoints fail. Once it is back,
    their leases run out, a reaper retries them, and they succeed (execute ran twice for
    those, which is allowed: it was never checkpointed)."""
    lost = _Lost()
    logging.getLogger("jobrunner").addHandler(lost)
    with JobRunner(url, registry=_registry(), heartbeat_interval=0.5) as runner:
        ids = [runner.submit(Blink, {"n": n}) for n in range(N)]
        thread = threading.Thread(
            target=runner.work,
            kwargs={"concurrency": CONCURRENCY, "poll_interval": 0.05, "reap_interval": 0.5},
        )
        thread.start()
        try:
            for _ in range(CONCURRENCY):
                assert GATE.started.acquire(timeout=120), "executions never reached execute"
            cluster.stop("fast")
            GATE.open.set()
            for _ in range(CONCURRENCY):
                assert lost.seen.acquire(timeout=120), "no failed write was reported"
            cluster.start()
            wait_for(
                lambda: all(runner.get(eid).status.is_terminal for eid in ids),
                "every execution to end after the outage",
            )
        finally:
            logging.getLogger("jobrunner").removeHandler(lost)
            GATE.open.set()
            runner.stop_work()
            thread.join()
        _assert_all_ended(runner, ids)
        retried = [e for e in (runner.get(eid) for eid in ids) if e.attempt > 1]
        assert len(retried) == CONCURRENCY
        for execution in retried:
            assert [a.status.value for a in runner.attempts(execution.id)] == [
                "abandoned",
                "succeeded",
            ]


@pytest.mark.parametrize("runner_kind", ["sync", "async"])
def test_stale_connections_are_found_without_a_round_trip_per_checkout(
    cluster: Cluster, url: str, runner_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Healthy pooled connections are not pinged; ones the server closed are found (and
    only those pinged) and replaced, so the next run after pg_terminate_backend succeeds."""

    def terminate() -> None:
        admin = sa.create_engine(
            sa.make_url(url).set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool
        )
        with admin.begin() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        admin.dispose()

    def counting(engine: sa.Engine) -> list[int]:
        """Count pings on every engine of this dialect (a runner has two or three)."""
        pings = [0]
        dialect_class = type(engine.dialect)
        original = dialect_class.do_ping

        def do_ping(self: Any, dbapi_connection: Any) -> bool:
            pings[0] += 1
            return bool(original(self, dbapi_connection))

        monkeypatch.setattr(dialect_class, "do_ping", do_ping)
        return pings

    if runner_kind == "sync":
        with JobRunner(url, registry=_registry()) as runner:
            pings = counting(runner.engine)
            for _ in range(10):
                assert runner.run(Quick).succeeded
            assert pings == [0]
            terminate()
            execution = runner.run(Quick)
            assert execution.succeeded, execution.error_message
            assert pings[0] >= 1
        return

    async def main() -> None:
        async with AsyncJobRunner(url, registry=_registry()) as runner:
            pings = counting(runner.engine.sync_engine)
            for _ in range(10):
                assert (await runner.run(Quick)).succeeded
            assert pings == [0]
            terminate()  # blocks the loop: the goodbye is still unread on the sockets
            execution = await runner.run(Quick)
            assert execution.succeeded, execution.error_message
            assert pings[0] >= 1

    asyncio.run(main())
