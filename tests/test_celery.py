"""Celery integration against a real Redis broker and real worker processes.

Each store (SQLite file, PostgreSQL) gets one prefork worker subprocess
(``celery -A tests.celery_app worker --pool=prefork --concurrency=2``) on a queue of its
own in a Redis database picked for this run; the tests enqueue through a client app and
wait by polling the executions table against a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from jobrunner import ExecutionStatus, InvalidArgs, JobNotFound, JobRunner, metadata
from jobrunner.contrib.celery import TASK_NAME, CeleryJobs, EnqueueFailed, install

from . import celery_jobs
from ._services import free_port, redis_server, scratch_database, stop_process
from .conftest import Backend, assert_no_checked_out
from .support import make_notes_table, note_texts

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {s.value for s in ExecutionStatus if s.is_terminal}
BAD_LOOP_ERRORS = ("attached to a different loop", "another operation is in progress")
JOB = "tests.celery"


def _require_broker() -> bool:
    return os.environ.get("JOBRUNNER_REQUIRE_BROKER", "") not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    """A Redis URL on a database picked for this run (skip, or fail under CI, if none)."""
    with redis_server() as (url, how):
        if url is None:
            if _require_broker():
                pytest.fail(f"JOBRUNNER_REQUIRE_BROKER=1 but {how}")
            pytest.skip(how)
        yield url.rpartition("/")[0] + f"/{random.randint(1, 15)}"


def _forget(broker: str, *queues: str) -> None:
    """Delete every Redis key of these (run-unique) queues: messages, bindings."""
    client = redis.Redis.from_url(broker)
    try:
        for queue in queues:
            for key in client.scan_iter(match=f"*{queue}*"):
                client.delete(key)
    finally:
        client.close()


def _client(broker: str, url: str, queue: str) -> tuple[Celery, CeleryJobs]:
    app = Celery(f"client-{queue}", broker=broker, backend=broker)
    app.conf.update(task_default_queue=queue, worker_enable_remote_control=False)
    return app, install(app, database_url=url)


@dataclasses.dataclass
class Worker:
    """A worker subprocess on one store and queue, and a client app to talk to it."""

    store: str
    url: str
    queue: str
    broker: str
    log: Path
    proc: subprocess.Popen[bytes]
    app: Celery
    jobs: CeleryJobs

    @property
    def runner(self) -> JobRunner:
        return self.jobs.runner

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Warm shutdown (SIGTERM); kill if it hangs. Returns the exit code."""
        return stop_process(self.proc)

    def wait(
        self, ids: list[uuid.UUID], *, timeout: float = 60.0, done: Callable[[Any], bool] | None
        = None
    ) -> dict[uuid.UUID, Any]:
        """Poll the executions table until every id is finished (or ``done``)."""
        done = done or (lambda e: e.status.value in TERMINAL)
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            found = {e.id: e for e in self.runner.list(limit=100_000) if e.id in wanted}
            if len(found) == len(wanted) and all(done(e) for e in found.values()):
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"the worker exited ({self.proc.returncode}):\n{self.logs()[-3000:]}")
            if time.monotonic() > deadline:
                waiting = collections.Counter(e.status.value for e in found.values())
                pytest.fail(
                    f"{len(wanted)} executions not done after {timeout}s: {dict(waiting)}\n"
                    f"{self.logs()[-3000:]}"
                )
            time.sleep(0.05)


def _start(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database of its own with the jobrunner schema and the notes table."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('celery') / 'jobs.db'}"
        _create_schema(url)
        yield url
        return
    server = request.getfixturevalue("pg_server")
    with scratch_database(server, prefix="jobrunner_celery") as pg:
        url = pg.render_as_string(hide_password=False)
        _create_schema(url)
        yield url


def _create_schema(url: str) -> None:
    engine = sa.create_engine(
        sa.make_url(url).set(drivername="postgresql+psycopg")
        if url.startswith("postgres") else url
    )
    metadata.create_all(engine)
    engine.dispose()
    make_notes_table(url)


@pytest.fixture(scope="module")
def worker(store: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Worker]:
    """A prefork worker, concurrency 2, on a queue of its own; stopped at the end."""
    with _spawn(store, broker_url, tmp_path_factory.mktemp("worker"), "prefork", 2) as w:
        yield w


@contextlib.contextmanager
def _spawn(url: str, broker: str, folder: Path, pool: str, concurrency: int) -> Iterator[Worker]:
    queue = f"jobrunner-test-{uuid.uuid4().hex[:10]}"
    log = folder / "worker.log"
    env = {"JOBRUNNER_DATABASE_URL": url, "JOBRUNNER_TEST_BROKER": broker,
           "JOBRUNNER_TEST_QUEUE": queue}
    cmd = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
           f"--pool={pool}", f"--concurrency={concurrency}", "-Q", queue, "--loglevel=INFO",
           "--without-gossip", "--without-mingle", "--without-heartbeat",
           "-n", f"{queue}@%h"]
    proc = _start(cmd, env, log)
    app, jobs = _client(broker, url, queue)
    w = Worker(url.partition(":")[0], url, queue, broker, log, proc, app, jobs)
    try:
        yield w
    finally:
        w.stop()
        if jobs._sync is not None:
            assert_no_checked_out(jobs.runner.engine.pool, "the client's JobRunner")
        jobs.close()
        _forget(broker, queue)


def _logs_clean(logs: str) -> None:
    for bad in BAD_LOOP_ERRORS:
        assert bad not in logs, f"worker log shows {bad!r}"


# -- the worker -------------------------------------------------------------------------


def test_async_jobs_share_one_loop_per_process(worker: Worker) -> None:
    """200 async jobs on a prefork worker: all succeed, one event loop per process."""
    ids = [worker.jobs.enqueue(f"{JOB}.async_probe", {"n": n}) for n in range(200)]
    done = worker.wait(ids, timeout=60)
    assert {e.status.value for e in done.values()} == {"succeeded"}
    by_pid: dict[int, set[int]] = collections.defaultdict(set)
    for e in done.values():
        by_pid[e.result["pid"]].add(e.result["loop"])
        assert e.result["thread"] == "jobrunner-loop"
    assert 1 <= len(by_pid) <= 2
    assert all(len(loops) == 1 for loops in by_pid.values()), by_pid
    last = {e.result["pid"]: e.result["loops"] for e in done.values()}
    assert all(created == ["jobrunner-loop"] for created in last.values()), last
    _logs_clean(worker.logs())


def test_sync_jobs_never_create_a_loop(worker: Worker) -> None:
    """Sync jobs run in the pool process's main thread with no event loop of their own."""
    ids = [worker.jobs.enqueue(f"{JOB}.sync_probe", {"n": n}) for n in range(20)]
    done = worker.wait(ids)
    for e in done.values():
        assert e.status.value == "succeeded", e.error_message
        result = e.result
        assert result["thread"] == "MainThread"
        assert result["running_loop"] is False
        assert result["policy_loop"] is False
        # the only loop this process ever made is its jobrunner loop, made at start-up
        assert result["loops"] == ["jobrunner-loop"], result


def test_duplicate_message_runs_execute_once(worker: Worker) -> None:
    """The same execution id sent again while running, and after, runs execute once."""
    eid = worker.jobs.enqueue(f"{JOB}.slow_note", {"seconds": 1.0})
    worker.wait([eid], done=lambda e: e.status.value == "running")
    again = worker.app.send_task(TASK_NAME, args=[str(eid)], ignore_result=False)
    assert again.get(timeout=30) == {"execution_id": str(eid), "status": "running"}
    worker.wait([eid])
    late = worker.app.send_task(  # as enqueue sends it: with the job named
        TASK_NAME, args=[str(eid)], kwargs={"job": celery_jobs.SlowNote.handler},
        ignore_result=False)
    assert late.get(timeout=30) == {"execution_id": str(eid), "status": "succeeded"}
    execution = worker.runner.get(eid)
    assert execution.status is ExecutionStatus.SUCCEEDED
    assert [a.number for a in worker.runner.attempts(eid)] == [1]
    assert note_texts(worker.url).count(f"slow:{eid}") == 1


def test_retry_waits_become_countdowns(worker: Worker) -> None:
    """A failing sync job is retried by new Celery messages; the ledger has every attempt."""
    eid = worker.jobs.enqueue(f"{JOB}.flaky")
    execution = worker.wait([eid], timeout=30)[eid]
    assert execution.status is ExecutionStatus.SUCCEEDED and execution.result == 3
    attempts = worker.runner.attempts(eid)
    assert [(a.number, a.status.value) for a in attempts] == [
        (1, "failed"), (2, "failed"), (3, "succeeded")]
    assert [a.wait_s for a in attempts] == [0.2, 0.2, None]
    for before, after in itertools.pairwise(attempts):
        assert (after.started_at - before.finished_at).total_seconds() >= 0.15
    tasks = [t.rsplit(":", 1)[1] for t in note_texts(worker.url) if t.startswith(f"flaky:{eid}")]
    assert len(tasks) == 3 and len(set(tasks)) == 3, "each attempt came in its own message"
    assert execution.external_id == tasks[-1]


def test_async_retry_waits_become_countdowns(worker: Worker) -> None:
    """The same for an async job: retried through the broker, never by sleeping."""
    eid = worker.jobs.enqueue(f"{JOB}.async_flaky")
    first_task = worker.runner.get(eid).external_id
    execution = worker.wait([eid], timeout=30)[eid]
    assert execution.status is ExecutionStatus.SUCCEEDED and execution.result == 3
    attempts = worker.runner.attempts(eid)
    assert [a.status.value for a in attempts] == ["failed", "failed", "succeeded"]
    assert execution.external_id != first_task


def test_beat_creates_and_runs_executions(worker: Worker, tmp_path: Path) -> None:
    """Beat's tick messages become executions (triggered_by celery-beat) that succeed."""
    env = {"JOBRUNNER_DATABASE_URL": worker.url, "JOBRUNNER_TEST_BROKER": worker.broker,
           "JOBRUNNER_TEST_QUEUE": worker.queue}
    cmd = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "beat",
           "-s", str(tmp_path / "beat-schedule"), "--loglevel=INFO", "--max-interval=1"]
    beat = _start(cmd, env, tmp_path / "beat.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            ticks = [e for e in worker.runner.list(job=f"{JOB}.tick") if e.succeeded]
            if len(ticks) >= 2:
                break
            assert beat.poll() is None, (tmp_path / "beat.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "beat.log").read_text()
            time.sleep(0.1)
    finally:
        beat.terminate()
        beat.wait(15)
    assert all(e.triggered_by == "celery-beat" and e.external_id for e in ticks)
    assert all(e.result == 1 for e in ticks)


def test_shutdown_closes_each_process_loop(worker: Worker) -> None:
    """At warm shutdown every pool process closes its loop; no loop errors were logged."""
    pids = {e.result["pid"] for e in worker.runner.list(job=f"{JOB}.async_probe", limit=1000)}
    assert worker.stop() == 0
    logs = worker.logs()
    _logs_clean(logs)
    for pid in pids:
        assert f"closed the event loop of worker process {pid}" in logs


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_solo_and_threads_pools_keep_one_loop(pool: str, broker_url: str, tmp_path: Path) -> None:
    """Solo and threads pools: one loop for the process, made at start, closed at shutdown."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    _create_schema(url)
    with _spawn(url, broker_url, tmp_path, pool, 4) as worker:
        ids = [worker.jobs.enqueue(f"{JOB}.async_probe", {"n": n}) for n in range(40)]
        ids += [worker.jobs.enqueue(f"{JOB}.sync_probe", {"n": n}) for n in range(10)]
        done = worker.wait(ids)
        assert worker.stop() == 0
    results = [e.result for e in done.values() if e.succeeded]
    assert len(results) == 50
    [pid] = {r["pid"] for r in results}
    assert len({r["loop"] for r in results if "loop" in r}) == 1
    assert all(r["loops"] == ["jobrunner-loop"] for r in results)
    sync = [r for r in results if "running_loop" in r]
    assert not any(r["running_loop"] or r["policy_loop"] for r in sync)
    assert all(r["thread"] != "jobrunner-loop" for r in sync)
    logs = worker.logs()
    _logs_clean(logs)
    assert f"closed the event loop of worker process {pid}" in logs


# -- enqueue and install, against the real broker ---------------------------------------------


def test_enqueue_with_broker_down_keeps_the_row_for_the_relay(backend: Backend) -> None:
    """If the message can't be sent the error is clear and the row stays, marked unsent,
    for the relay (a jobrunner worker leaves Celery's executions to Celery)."""
    app = Celery("down", broker=f"redis://127.0.0.1:{free_port()}/0")
    app.conf.update(task_publish_retry_policy={"max_retries": 1, "interval_start": 0})
    jobs = install(app, database_url=backend.url)
    with pytest.raises(EnqueueFailed, match="the relay") as info:
        jobs.enqueue(f"{JOB}.tick", {"n": 5})
    execution = jobs.runner.get(info.value.execution_id)
    assert execution.status is ExecutionStatus.PENDING
    assert execution.dispatch == "celery" and execution.dispatched_at is None
    assert jobs.runner.run_due() == []  # Celery's, not a jobrunner worker's
    jobs.close()


def test_enqueue_sends_once_per_idempotency_key(broker_url: str, backend: Backend) -> None:
    """A repeated idempotency key returns the first execution and sends no second message."""
    queue = f"jobrunner-idem-{uuid.uuid4().hex[:10]}"
    app, jobs = _client(broker_url, backend.url, queue)
    try:
        first = jobs.enqueue(f"{JOB}.tick", {"n": 1}, idempotency_key="k1")
        again = jobs.enqueue(f"{JOB}.tick", {"n": 1}, idempotency_key="k1")
        assert first == again
        execution = jobs.runner.get(first)
        assert execution.status is ExecutionStatus.PENDING and execution.due_at is not None
        with app.connection_for_write() as conn:
            _, depth, _ = conn.default_channel.queue_declare(queue, passive=True)
            assert depth == 1
            message = conn.default_channel.basic_get(queue, no_ack=True)
            assert message.headers["id"] == execution.external_id
            assert message.headers["task"] == TASK_NAME
    finally:
        _forget(broker_url, queue)
        jobs.close()


def test_install_applies_recommended_settings_unless_set() -> None:
    """acks_late, reject_on_worker_lost and prefetch 1 become defaults; user values win."""
    app = Celery("settings", broker="memory://")
    app.conf.worker_prefetch_multiplier = 4
    install(app, database_url="sqlite://")
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 4
    assert app.tasks[TASK_NAME].acks_late is True


def test_add_periodic_checks_job_args_and_schedule() -> None:
    """Unknown jobs, bad args, bad schedules and duplicate names fail at call time."""
    app = Celery("beat", broker="memory://")
    jobs = install(app, database_url="sqlite://")
    with pytest.raises(JobNotFound, match="tick"):
        jobs.add_periodic(f"{JOB}.tik", {"n": 1}, schedule=10)
    with pytest.raises(InvalidArgs):
        jobs.add_periodic(f"{JOB}.tick", {"n": "many"}, schedule=10)
    with pytest.raises(ValueError, match="schedule"):
        jobs.add_periodic(f"{JOB}.tick", {"n": 1}, schedule="often")
    name = jobs.add_periodic(f"{JOB}.tick", {"n": 2}, schedule=10, queue="q1")
    assert app.conf.beat_schedule[name] == {
        "task": TASK_NAME,
        "schedule": 10,
        "kwargs": {"job": celery_jobs.Tick.handler, "args": {"n": 2}},
        "options": {"queue": "q1"},
    }
    with pytest.raises(ValueError, match="already has an entry"):
        jobs.add_periodic(f"{JOB}.tick", {"n": 3}, schedule=10)


# -- the example app ------------------------------------------------------------------------


def test_example_app_runs(broker_url: str, tmp_path: Path) -> None:
    """examples/celery_app: its worker runs the sync and the async job enqueue.py sends."""
    folder = ROOT / "examples" / "celery_app"
    queue = f"jobrunner-example-{uuid.uuid4().hex[:10]}"
    env = {"CELERY_BROKER_URL": broker_url, "CELERY_QUEUE": queue,
           "JOBRUNNER_DATABASE_URL": f"sqlite:///{tmp_path / 'example.db'}",
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "worker.log"
    worker = _start(
        [sys.executable, "-m", "celery", "-A", "app", "worker", "--pool=prefork",
         "--concurrency=2", "--loglevel=INFO", "--without-gossip", "--without-mingle"],
        env, log, cwd=folder)
    try:
        out = subprocess.run([sys.executable, "enqueue.py"], cwd=folder, env={**os.environ, **env},
                             capture_output=True, text=True, timeout=90)
    finally:
        worker.terminate()
        worker.wait(30)
        _forget(broker_url, queue)
    assert out.returncode == 0, out.stdout + out.stderr + log.read_text()
    assert "example.count_words: succeeded -> {'words': 4}" in out.stdout
    assert "example.fetch_greeting: succeeded -> 'hello, celery" in out.stdout


def test_howto_page_blocks_run(tmp_path: Path) -> None:
    """docs/howto/celery.md: its Python blocks run, enqueue included (in-memory broker)."""
    text = (ROOT / "docs" / "howto" / "celery.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict[str, Any] = {"__name__": "docs_celery_howto"}
    exec(compile("\n\n".join(blocks), "docs/howto/celery.md", "exec"), namespace)
    app, jobs = namespace["app"], namespace["jobs"]
    assert set(app.conf.beat_schedule) == {
        "jobrunner:howto.count_words", "monday-greeting", "jobrunner-relay"}
    app.conf.broker_url = "memory://"
    jobs.database_url = f"sqlite:///{tmp_path / 'howto.db'}"
    jobs.runner.create_schema()
    namespace["send_some"]()
    executions = jobs.runner.list()
    assert len(executions) == 3
    assert all(e.status is ExecutionStatus.PENDING and e.external_id for e in executions)
    jobs.close()
