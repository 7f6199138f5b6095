"""Paused queues hold every worker; operator actions are audited with who and when."""

from __future__ import annotations

import threading

import pytest

from jobrunner import JobRunner, Registry

from ._services import wait_for
from .conftest import Backend
from .jobs import Greet


def _runner(backend: Backend) -> JobRunner:
    registry = Registry()
    registry.register(Greet)
    return JobRunner(backend.url, registry=registry)


def test_a_paused_queue_is_skipped_by_workers_until_resumed(backend: Backend) -> None:
    with _runner(backend) as runner:
        assert runner.pause_queue("slow", actor="ops")
        assert not runner.pause_queue("slow", actor="ops")  # already paused: no change
        held = runner.submit(Greet, {"who": "held"}, queue="slow")
        free = runner.submit(Greet, {"who": "free"}, queue="fast")

        ran = runner.run_due()
        assert [e.id for e in ran] == [free]
        runner.work(concurrency=2, until_idle=True)
        assert runner.get(held).status.value == "pending"
        assert runner.paused_queues() == {"slow"}

        assert runner.resume_queue("slow", actor="ops")
        assert not runner.resume_queue("slow", actor="ops")
        assert [e.id for e in runner.run_due()] == [held]
        assert runner.get(held).succeeded
        assert runner.paused_queues() == set()
        [state] = runner.queues()
        assert state.name == "slow" and not state.paused and state.paused_by is None


def test_resume_wakes_a_waiting_worker(backend: Backend) -> None:
    """The worker polls once an hour here: only resume's wake-up can start the execution."""
    with _runner(backend) as worker_runner, _runner(backend) as operator:
        operator.pause_queue("q")
        execution = operator.submit(Greet, {"who": "later"}, queue="q")
        thread = threading.Thread(
            target=worker_runner.work, kwargs={"concurrency": 1, "poll_interval": 3600}
        )
        thread.start()
        try:
            # On SQLite nothing crosses processes or runners: resume through the
            # worker's own runner, which wakes its loop; PostgreSQL's NOTIFY does it
            # from any runner.
            resumer = operator if backend.is_postgres else worker_runner
            if backend.is_postgres:
                wait_for(lambda: worker_runner._worker is not None, "the worker to start")
            assert operator.get(execution).status.value == "pending"
            resumer.resume_queue("q")
            wait_for(lambda: operator.get(execution).succeeded, "the resumed execution")
        finally:
            worker_runner.stop_work()
            thread.join()


def test_operator_actions_are_audited(backend: Backend) -> None:
    with _runner(backend) as runner:
        failed = runner.submit(Greet, {"who": "x"})
        runner.cancel(failed, actor="alice")
        runner.retry(failed, actor="bob")
        runner.pause_queue("default", actor="carol")
        runner.resume_queue("default")

        entries = runner.audit()
        assert [(a.action, a.actor, a.queue) for a in entries] == [
            ("resume", "api", "default"),
            ("pause", "carol", "default"),
            ("retry", "bob", None),
            ("cancel", "alice", None),
        ]
        assert [a.action for a in runner.audit(failed)] == ["retry", "cancel"]
        assert entries[-1].detail == {"status": "cancelled"}
        assert all(a.at is not None and a.at.tzinfo is not None for a in entries)
        assert [a.action for a in runner.audit(limit=1)] == ["resume"]


def test_a_refused_action_writes_no_audit_row(backend: Backend) -> None:
    with _runner(backend) as runner:
        done = runner.run(Greet, {"who": "done"})
        with pytest.raises(Exception, match="succeeded"):
            runner.cancel(done.id, actor="mallory")
        assert runner.audit() == []
