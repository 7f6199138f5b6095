"""The Celery outbox under faults (issue 14): a real Redis we stop and start, a real worker,
processes killed between commit and publish, duplicate messages, a job at its limit.
Every execution ends succeeded, each execute runs exactly once (counted by the job in the
database), and nothing is left pending with no way forward."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from jobrunner import ExecutionStatus, metadata
from jobrunner.contrib.celery import CeleryJobs, EnqueueFailed, install

from . import celery_jobs  # noqa: F401  (registers the jobs the worker runs)
from ._services import free_port, port_open, scratch_database, stop_process, wait_for
from .support import make_notes_table, note_texts

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
JOB = "tests.celery"


class Redis:
    """A throwaway redis-server the test can stop and start again on the same port."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # this test stops and starts its broker: it needs its own
            if os.environ.get("JOBRUNNER_REQUIRE_BROKER", "") not in ("", "0", "false", "no"):
                pytest.fail("JOBRUNNER_REQUIRE_BROKER=1 but redis-server is not installed")
            pytest.skip("redis-server is not installed")
        self.binary, self.port, self.folder = binary, free_port(), folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open("127.0.0.1", self.port), "redis to listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(pg_server: sa.URL) -> Iterator[str]:
    """A PostgreSQL database of its own, with the schema and the notes table."""
    with scratch_database(pg_server, prefix="jobrunner_outbox") as url:
        rendered = url.render_as_string(hide_password=False)
        engine = sa.create_engine(url.set(drivername="postgresql+psycopg"))
        metadata.create_all(engine)
        engine.dispose()
        make_notes_table(rendered)
        yield rendered


def _client(redis: Redis, url: str, queue: str) -> CeleryJobs:
    app = Celery(f"outbox-{queue}", broker=redis.url)
    app.conf.update(task_default_queue=queue, worker_enable_remote_control=False,
                    broker_connection_retry_on_startup=True,
                    task_publish_retry_policy={"max_retries": 1, "interval_start": 0})
    # Short windows, so the relay acts within the test (a beat would call relay()).
    jobs = install(app, database_url=url, relay_interval=None, visibility=3.0)
    jobs.grace = 0.5
    return jobs


class Worker:
    """A prefork Celery worker subprocess on the throwaway broker."""

    def __init__(self, redis: Redis, url: str, queue: str, log: Path) -> None:
        env = {**os.environ, "JOBRUNNER_DATABASE_URL": url, "JOBRUNNER_TEST_BROKER": redis.url,
               "JOBRUNNER_TEST_QUEUE": queue}
        cmd = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
               "--pool=prefork", "--concurrency=2", "-Q", queue, "--loglevel=INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-n", f"{queue}@%h"]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def rig(redis: Redis, store: str, tmp_path: Path) -> Iterator[tuple[CeleryJobs, Worker]]:
    queue = f"jobrunner-outbox-{uuid.uuid4().hex[:10]}"
    jobs = _client(redis, store, queue)
    worker = Worker(redis, store, queue, tmp_path / "worker.log")
    yield jobs, worker
    worker.stop()
    jobs.close()


def _settle(jobs: CeleryJobs, ids: set[uuid.UUID], worker: Worker) -> dict[uuid.UUID, Any]:
    """Relay (as beat would) until every execution has finished; they must all succeed."""
    def finished() -> dict[uuid.UUID, Any]:
        jobs.relay()
        found = {e.id: e for e in jobs.runner.list(limit=10_000) if e.id in ids}
        done = all(e.status.is_terminal for e in found.values())
        return found if len(found) == len(ids) and done else {}

    try:
        found = wait_for(finished, "every execution to finish")
    except AssertionError:
        print(worker.log.read_text(errors="replace")[-4000:])
        raise
    assert {e.status for e in found.values()} == {ExecutionStatus.SUCCEEDED}
    return found


def _executed(url: str, ids: set[uuid.UUID]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in note_texts(url):
        if text.startswith("executed:"):
            eid = text.partition(":")[2]
            counts[eid] = counts.get(eid, 0) + 1
    return {str(i): counts.get(str(i), 0) for i in ids}


def test_duplicate_delivery_runs_execute_once(rig: tuple[CeleryJobs, Worker], store: str) -> None:
    """The same message delivered twice (and once more after it finished): one execute."""
    jobs, worker = rig
    eid = jobs.enqueue(f"{JOB}.counted", {"n": 1})
    for _ in range(2):  # a broker redelivering the message
        jobs.task.apply_async((str(eid),), {"job": f"{JOB}.counted"})
    _settle(jobs, {eid}, worker)
    late = str(uuid.uuid4())
    jobs.task.apply_async((str(eid),), {"job": f"{JOB}.counted"}, task_id=late)
    wait_for(lambda: f"[{late}] succeeded" in worker.log.read_text(errors="replace"),
              "the late duplicate to be handled")
    assert _executed(store, {eid}) == {str(eid): 1}


def test_a_job_at_its_limit_comes_back_by_countdown(rig: tuple[CeleryJobs, Worker],
                                                    store: str) -> None:
    """max_concurrency=1, four at once on two slots: none acked away, never two at once."""
    jobs, worker = rig
    ids = {jobs.enqueue(f"{JOB}.exclusive", {"n": n}) for n in range(4)}
    _settle(jobs, ids, worker)
    seen = [t for t in note_texts(store) if t.startswith("exclusive:")]
    assert len(seen) == 4 and all(t.endswith(":1") for t in seen), seen


def test_broker_down_during_enqueue_then_back(rig: tuple[CeleryJobs, Worker], redis: Redis,
                                              store: str) -> None:
    """Redis stops: enqueue fails clearly and keeps the row; Redis is back: the relay sends
    it, it runs once."""
    jobs, worker = rig
    sent = jobs.enqueue(f"{JOB}.counted", {"n": 1})  # before the outage
    redis.stop()
    with pytest.raises(EnqueueFailed, match="the relay") as info:
        jobs.enqueue(f"{JOB}.counted", {"n": 2})
    kept = jobs.runner.get(info.value.execution_id)
    assert kept.status is ExecutionStatus.PENDING and kept.dispatched_at is None
    assert jobs.relay() == 0  # the broker is still down: nothing is lost by trying
    redis.start()  # an empty Redis: whatever was queued before is gone too
    ids = {sent, info.value.execution_id}
    _settle(jobs, ids, worker)
    assert _executed(store, ids) == {str(i): 1 for i in ids}


@pytest.mark.parametrize("path", ["plain", "session"])
def test_a_process_killed_between_commit_and_publish(
    rig: tuple[CeleryJobs, Worker], redis: Redis, store: str, tmp_path: Path, path: str
) -> None:
    """kill -9 after the row committed, before its message went out: the relay sends it."""
    jobs, worker = rig
    script = tmp_path / "enqueue_and_die.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import sqlalchemy as sa
        from celery import Celery
        from sqlalchemy.orm import Session
        from jobrunner.contrib.celery import CeleryJobs, install
        import tests.celery_jobs  # the jobs, registered by name

        def die(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)  # committed, not yet published

        CeleryJobs._send = die
        app = Celery("dying", broker={redis.url!r})
        jobs = install(app, database_url={store!r}, relay_interval=None)
        if {path!r} == "session":
            engine = sa.create_engine(sa.make_url({store!r}).set(drivername="postgresql+psycopg"))
            with Session(engine) as session:
                jobs.enqueue("{JOB}.counted", {{"n": 7}}, session=session)
                session.commit()
        else:
            jobs.enqueue("{JOB}.counted", {{"n": 7}})
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    [row] = jobs.runner.list()
    assert row.status is ExecutionStatus.PENDING  # stored, no message anywhere
    _settle(jobs, {row.id}, worker)
    assert _executed(store, {row.id}) == {str(row.id): 1}


def test_enqueue_with_a_connection_is_left_to_the_relay(
    rig: tuple[CeleryJobs, Worker], store: str
) -> None:
    """A Core Connection cannot say when its commit is done: nothing is sent from it, and
    the relay sends the committed row (a rolled-back one never existed)."""
    jobs, worker = rig
    engine = sa.create_engine(sa.make_url(store).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            jobs.enqueue(f"{JOB}.counted", {"n": 1}, session=conn)
            conn.rollback()
        with engine.begin() as conn:
            eid = jobs.enqueue(f"{JOB}.counted", {"n": 2}, session=conn)
    finally:
        engine.dispose()
    assert [e.id for e in jobs.runner.list()] == [eid]
    assert jobs.runner.get(eid).dispatched_at is None
    _settle(jobs, {eid}, worker)
    assert _executed(store, {eid}) == {str(eid): 1}


def test_enqueue_in_a_rolled_back_transaction_sends_nothing(
    rig: tuple[CeleryJobs, Worker], store: str
) -> None:
    """session= and a rollback: no row, no message; a commit: one of each."""
    from sqlalchemy.orm import Session

    jobs, worker = rig
    engine = sa.create_engine(sa.make_url(store).set(drivername="postgresql+psycopg"))
    try:
        with Session(engine) as session:
            jobs.enqueue(f"{JOB}.counted", {"n": 1}, session=session)
            session.rollback()
        assert jobs.runner.list() == []
        with Session(engine) as session:
            eid = jobs.enqueue(f"{JOB}.counted", {"n": 2}, session=session)
            session.commit()
    finally:
        engine.dispose()
    _settle(jobs, {eid}, worker)
    assert _executed(store, {eid}) == {str(eid): 1}
