"""Enqueue that never loses a job (issue 14): what goes in comes out, keys that mean one
thing, scheduled runs, and submits that share the caller's transaction."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import math
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session

from jobrunner import (
    AsyncJobRunner,
    ConfigurationError,
    ExecutionStatus,
    IdempotencyConflict,
    InvalidArgs,
    JobRunner,
    PhasedJob,
    Registry,
)
from jobrunner._engine import make_async_engine, make_sync_engine

from .conftest import Backend
from .support import make_notes_table, note_texts, notes


class Echo(PhasedJob, register=False):
    """Returns its args: what went in must come out."""

    name = "enqueue.echo"

    def execute(self, args: dict[str, Any]) -> dict[str, Any]:
        return args


# -- what goes in comes out ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({"ratio": math.nan}, "nan at ratio"),
        ([1.0, math.inf], "inf at [1]"),
        ({"x": -math.inf}, "-inf at x"),
        ({"text": "a\x00b"}, "NUL character"),
        ({"tags": {"a", "b"}}, "a set at tags would come back as a list"),
        ({"big": 3.602879701896397e16}, "as a different integer"),
    ],
    ids=["nan", "inf", "-inf", "nul", "set", "big-float"],
)
def test_unstorable_results_fail_the_same_way_on_both_backends(
    runner: JobRunner, result: Any, problem: str
) -> None:
    """NaN, ±Infinity, NUL and sets: ResultNotSerializable before the checkpoint, both DBs."""

    class Returns(PhasedJob):
        name = "enqueue.returns"

        def execute(self, loaded: Any) -> Any:
            return result

    execution = runner.run(Returns)
    assert execution.status is ExecutionStatus.FAILED and not execution.checkpointed
    assert execution.error_type == "jobrunner.ResultNotSerializable"
    assert problem in (execution.error_message or "")


def test_unstorable_args_are_refused_at_submit(runner: JobRunner) -> None:
    """The same values as args: InvalidArgs at submit, nothing stored."""
    runner.registry.register(Echo)
    for bad in ({"ratio": math.nan}, {"text": "\x00"}, {"tags": {1, 2}}):
        with pytest.raises(InvalidArgs, match="cannot be stored"):
            runner.submit(Echo, bad)
    assert runner.list() == []


class Aliased(PhasedJob, register=False):
    """Args with field aliases (camelCase on the wire)."""

    name = "enqueue.aliased"

    class Args(BaseModel):
        user_id: int = Field(alias="userId")
        display_name: str = Field(alias="displayName")

    def execute(self, args: Args) -> str:
        return f"{args.user_id}:{args.display_name}"


def test_aliased_args_run_the_same_inline_and_queued(runner: JobRunner) -> None:
    """run() inline, submit() + a worker, and submit(Args(...)): all three succeed alike."""
    runner.registry.register(Aliased)
    payload = {"userId": 7, "displayName": "Ада"}
    inline = runner.run(Aliased, payload)
    queued = runner.submit(Aliased, payload)
    from_model = runner.submit(Aliased, Aliased.Args(userId=8, displayName="Bo"))
    ran = {e.id: e for e in runner.run_due()}
    assert inline.result == ran[queued].result == "7:Ада"
    assert ran[from_model].result == "8:Bo"
    assert runner.get(queued).args == payload


class Kind(enum.Enum):
    A = "a"
    B = "b"


class Rich(PhasedJob, register=False):
    """Args of many types; returns them through a Result model."""

    name = "enqueue.rich"

    class Args(BaseModel):
        when: dt.datetime
        day: dt.date
        amount: decimal.Decimal
        ref: uuid.UUID
        kind: Kind
        tags: set[str]
        nested: dict[str, list[int]]
        text: str

    class Result(BaseModel):
        echoed: Rich.Args  # type: ignore[name-defined]

    def execute(self, args: Args) -> Any:
        return self.Result(echoed=args)

    def record(self, session: Any, result: Any) -> None:
        RECORDED.append(result.echoed)


RECORDED: list[Any] = []
Rich.Result.model_rebuild()

_text = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=20)
_rich_args = st.builds(
    dict,
    when=st.datetimes(timezones=st.just(dt.UTC)),
    day=st.dates(),
    amount=st.decimals(allow_nan=False, allow_infinity=False, places=4,
                       min_value=-10**9, max_value=10**9),
    ref=st.uuids(),
    kind=st.sampled_from(Kind),
    tags=st.sets(_text, max_size=3),
    nested=st.dictionaries(_text, st.lists(st.integers(-10**12, 10**12), max_size=3),
                           max_size=3),
    text=_text,
)


def test_typed_args_and_results_round_trip_on_both_backends(runner: JobRunner) -> None:
    """Datetimes, decimals, UUIDs, enums, sets, unicode: submitted, run, recorded alike."""
    runner.registry.register(Rich)

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(args=_rich_args)
    def check(args: dict[str, Any]) -> None:
        RECORDED.clear()
        eid = runner.submit(Rich, args)
        [execution] = runner.run_due()
        assert execution.id == eid and execution.succeeded
        assert [Rich.Args(**args)] == RECORDED

    check()


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**15, 10**15)
    | st.floats(min_value=-1e15, max_value=1e15) | _text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_text, children, max_size=3),
    max_leaves=12,
)


def test_plain_json_args_and_results_round_trip_on_both_backends(runner: JobRunner) -> None:
    """Any JSON (no Args model): stored args and checkpointed result equal what went in."""
    runner.registry.register(Echo)

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(args=st.dictionaries(_text, _json, max_size=4))
    def check(args: dict[str, Any]) -> None:
        eid = runner.submit(Echo, args)
        [execution] = runner.run_due()
        assert execution.id == eid
        assert runner.get(eid).args == args and execution.result == args

    check()


def test_args_above_the_limit_are_refused_with_the_size(backend: Backend) -> None:
    """max_args_bytes (default 1 MB): bigger args fail at submit saying how big and why."""
    runner = JobRunner(backend.url, registry=Registry([Echo]))
    roomy = JobRunner(backend.url, registry=Registry([Echo]), max_args_bytes=None)
    try:
        big = {"blob": "x" * 1_100_000}
        with pytest.raises(InvalidArgs, match=r"1,100,\d{3} bytes as JSON, above .*1,000,000"):
            runner.submit(Echo, big)
        with pytest.raises(InvalidArgs, match="max_args_bytes"):
            runner.run(Echo, big)
        assert runner.list() == []
        assert roomy.submit(Echo, big)  # the limit is per runner
    finally:
        runner.close()
        roomy.close()


# -- keys that mean one thing -------------------------------------------------------------------


class Other(PhasedJob, register=False):
    name = "enqueue.other"

    def execute(self, args: dict[str, Any]) -> None:
        return None


def test_an_idempotency_key_belongs_to_its_job(runner: JobRunner) -> None:
    """The same key on another job is another execution; on the same job, the same one."""
    runner.registry.register(Echo)
    runner.registry.register(Other)
    first = runner.submit(Echo, {"n": 1}, idempotency_key="order-42")
    assert runner.submit(Echo, {"n": 1}, idempotency_key="order-42") == first
    other = runner.submit(Other, {"x": "y"}, idempotency_key="order-42")
    assert other != first and len(runner.list()) == 2


def test_a_key_reused_with_other_args_raises_naming_the_execution(runner: JobRunner) -> None:
    """IdempotencyConflict names the execution that holds the key; nothing new is stored."""
    runner.registry.register(Echo)
    first = runner.submit(Echo, {"amount": 10}, idempotency_key="charge-1")
    with pytest.raises(IdempotencyConflict, match=str(first)) as info:
        runner.submit(Echo, {"amount": 99}, idempotency_key="charge-1")
    assert info.value.execution_id == first and len(runner.list()) == 1


async def test_async_keys_mean_the_same(arunner: AsyncJobRunner) -> None:
    """The async runner: scoped keys and conflicts alike."""
    arunner.registry.register(Echo)
    first = await arunner.submit(Echo, {"n": 1}, idempotency_key="k")
    assert await arunner.submit(Echo, {"n": 1}, idempotency_key="k") == first
    with pytest.raises(IdempotencyConflict):
        await arunner.submit(Echo, {"n": 2}, idempotency_key="k")


def test_unique_for_lets_a_key_run_again_after_its_window(runner: JobRunner) -> None:
    """Within unique_for the key returns the first execution; after it, a new one."""
    runner.registry.register(Echo)
    first = runner.submit(Echo, {"n": 1}, idempotency_key="daily", unique_for=3600)
    assert runner.submit(Echo, {"n": 1}, idempotency_key="daily", unique_for=3600) == first
    with runner.engine.begin() as conn:  # the first one was created two hours ago
        conn.execute(sa.update(sa.table("jobrunner_executions", sa.column("created_at")))
                     .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)))
    second = runner.submit(Echo, {"n": 2}, idempotency_key="daily", unique_for=3600)
    assert second != first  # a new request: other args are fine once the window passed
    assert runner.get(first).idempotency_key is None  # released
    assert runner.get(second).idempotency_key == "daily"
    with pytest.raises(IdempotencyConflict):  # within the new one's window: one request
        runner.submit(Echo, {"n": 3}, idempotency_key="daily", unique_for=3600)


# -- scheduled runs ------------------------------------------------------------------------------


def test_run_at_and_delay_make_an_execution_due_later(runner: JobRunner) -> None:
    """Not run before it is due; run by run_due once the time has come."""
    runner.registry.register(Echo)
    later = runner.submit(Echo, {"w": "at"}, run_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    delayed = runner.submit(Echo, {"w": "in"}, delay=dt.timedelta(minutes=30))
    now = runner.submit(Echo, {"w": "now"})
    assert [e.id for e in runner.run_due()] == [now]
    for eid in (later, delayed):
        due = runner.get(eid).due_at
        assert due is not None and due > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=29)
    with runner.engine.begin() as conn:  # time passes
        conn.execute(sa.text("UPDATE jobrunner_executions SET due_at = created_at"))
    assert {e.id for e in runner.run_due()} == {later, delayed}


def test_bad_schedules_are_configuration_errors(runner: JobRunner) -> None:
    """Naive datetimes, negative delays and both at once say what is wrong."""
    runner.registry.register(Echo)
    with pytest.raises(ConfigurationError, match="aware datetime"):
        runner.submit(Echo, run_at=dt.datetime(2030, 1, 1))
    with pytest.raises(ConfigurationError, match="delay must be seconds >= 0"):
        runner.submit(Echo, delay=-1)
    with pytest.raises(ConfigurationError, match="run_at or delay, not both"):
        runner.submit(Echo, run_at=dt.datetime.now(dt.UTC), delay=1)


# -- transactional submit ------------------------------------------------------------------------


def test_submit_in_the_callers_transaction_commits_or_not_with_it(
    backend: Backend, runner: JobRunner
) -> None:
    """Rollback: no note, no execution. Commit: the note and exactly one execution."""
    runner.registry.register(Echo)
    make_notes_table(backend.url)
    engine = make_sync_engine(backend.url)
    try:
        with Session(engine) as session:
            session.execute(sa.insert(notes).values(text="rolled back"))
            runner.submit(Echo, {"n": 1}, session=session)
            session.rollback()
        assert runner.list() == [] and note_texts(backend.url) == []
        with Session(engine) as session:
            session.execute(sa.insert(notes).values(text="committed"))
            eid = runner.submit(Echo, {"n": 2}, session=session)
            session.commit()
        assert [e.id for e in runner.list()] == [eid]
        assert note_texts(backend.url) == ["committed"]
        with engine.begin() as conn:  # a Connection works too
            runner.submit(Echo, {"n": 3}, session=conn)
        assert len(runner.list()) == 2
    finally:
        engine.dispose()


async def test_async_submit_in_the_callers_transaction(backend: Backend,
                                                       arunner: AsyncJobRunner) -> None:
    """AsyncSession and AsyncConnection: the execution exists iff the caller commits."""
    arunner.registry.register(Echo)
    make_notes_table(backend.url)
    engine = make_async_engine(backend.url)
    try:
        async with async_sessionmaker(engine)() as session:
            await session.execute(sa.insert(notes).values(text="rolled back"))
            await arunner.submit(Echo, {"n": 1}, session=session)
            await session.rollback()
        assert await arunner.list() == []
        async with async_sessionmaker(engine)() as session:
            await session.execute(sa.insert(notes).values(text="committed"))
            eid = await arunner.submit(Echo, {"n": 2}, session=session)
            await session.commit()
        assert [e.id for e in await arunner.list()] == [eid]
        async with engine.begin() as conn:
            await arunner.submit(Echo, {"n": 3}, session=conn)
        assert len(await arunner.list()) == 2
        assert note_texts(backend.url) == ["committed"]
    finally:
        await engine.dispose()


def test_a_session_on_another_database_is_refused(backend: Backend, runner: JobRunner,
                                                  tmp_path: Any) -> None:
    """session= on a different database cannot share a transaction: a clear error."""
    runner.registry.register(Echo)
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        with Session(other) as session, pytest.raises(ConfigurationError,
                                                      match="same database"):
            runner.submit(Echo, {"n": 1}, session=session)
    finally:
        other.dispose()


def test_show_shortens_long_values_unless_asked(backend: Backend, runner: JobRunner) -> None:
    """A 200 kB arg prints as its start and a count in show; --full prints it whole."""
    from typer.testing import CliRunner

    from jobrunner.cli import app

    runner.registry.register(Echo)
    eid = runner.submit(Echo, {"blob": "z" * 200_000})
    cli = CliRunner()
    short = cli.invoke(app, ["--database-url", backend.url, "show", str(eid)],
                       env={"COLUMNS": "120"})
    assert short.exit_code == 0
    assert "more characters; --full shows all" in " ".join(short.stdout.split())
    assert len(short.stdout) < 20_000
    full = cli.invoke(app, ["--database-url", backend.url, "show", str(eid), "--full"],
                      env={"COLUMNS": "120"})
    assert full.stdout.count("z") >= 200_000
