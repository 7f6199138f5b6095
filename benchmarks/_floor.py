"""The floor: jobrunner's three transactions per execution, written by hand with raw asyncpg.

Per execution, one statement and one commit each (autocommit, so one round trip each), into
jobrunner's own tables with the same columns:
1. insert the execution row already ``running`` (what an inline run's load phase does);
2. checkpoint the result (``UPDATE ... RETURNING cancel_requested``);
3. mark it ``succeeded`` and append its attempt-ledger row: one data-modifying CTE
   (``WITH finished AS (UPDATE ... RETURNING *) INSERT INTO jobrunner_attempts ...``).
Each worker owns one connection (no pool); asyncpg prepares each statement once per
connection. Nothing cheaper writes the same rows with the same durability.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import asyncpg
import sqlalchemy as sa

from ._harness import Sample
from ._jobs import run_many, run_many_sample

INSERT = """
INSERT INTO jobrunner_executions (
    id, job, handler, args, status, phase, attempt, max_attempts, triggered_by, worker,
    lease_token, cancel_requested, created_at, started_at, heartbeat_at, checkpointed)
VALUES ($1, 'bench.floor', 'benchmarks._floor:floor', $2::jsonb, 'running', 'load', 1, 1,
        'inline', $3, 1, false, $4, $4, $4, false)
"""
CHECKPOINT = """
UPDATE jobrunner_executions
SET result = 'null'::jsonb, checkpointed = true, phase = 'record', heartbeat_at = $2,
    load_ms = $3, execute_ms = $3
WHERE id = $1 AND status = 'running' AND lease_token = 1
RETURNING cancel_requested
"""
FINISH = """
WITH finished AS (
    UPDATE jobrunner_executions
    SET status = 'succeeded', finished_at = $2, heartbeat_at = $2, phase = 'record',
        max_loop_lag_ms = NULL, load_ms = $3, execute_ms = $3, record_ms = $3
    WHERE id = $1 AND status = 'running' AND lease_token = 1
    RETURNING *
), ledger AS (
    INSERT INTO jobrunner_attempts (
        execution_id, number, status, phase, resumed_from, worker, triggered_by, started_at,
        finished_at, load_ms, execute_ms, record_ms)
    SELECT id, 1, 'succeeded', 'record', 'load', worker, triggered_by, started_at, $2,
           $3, $3, $3
    FROM finished
)
SELECT * FROM finished
"""
WORKER = "bench-floor"
ARGS = json.dumps({})


async def one_execution(conn: asyncpg.Connection) -> None:
    """One tracked no-op execution: three transactions, three commits."""
    eid, started = uuid.uuid4(), datetime.now(UTC)
    await conn.execute(INSERT, eid, ARGS, WORKER, started)
    if await conn.fetchval(CHECKPOINT, eid, datetime.now(UTC), 0.01):
        raise RuntimeError("cancelled")
    if await conn.fetchrow(FINISH, eid, datetime.now(UTC), 0.01) is None:
        raise RuntimeError("lease lost")


async def run_floor(url: sa.URL, n: int, concurrency: int) -> Sample:
    """Seconds for ``n`` executions from ``concurrency`` connections (connecting not timed)."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    conns = [await asyncpg.connect(dsn) for _ in range(concurrency)]
    free: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
    for conn in conns:
        free.put_nowait(conn)

    async def one() -> None:
        conn = free.get_nowait()  # as many workers as connections: never empty
        try:
            await one_execution(conn)
        finally:
            free.put_nowait(conn)

    try:
        await run_many(one, 20 * concurrency, concurrency)  # warm up: prepare statements
        return await run_many_sample(one, n, concurrency)
    finally:
        for conn in conns:
            await conn.close()
