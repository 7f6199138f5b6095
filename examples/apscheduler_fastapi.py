"""FastAPI + AsyncIOScheduler: an async job and a blocking sync job, and /health stays fast.

The sync job stands in for the cleanup that froze a whole app in an APScheduler audit (SQL
deletes and S3 garbage collection inside an ``async def`` job): here it blocks for two
seconds in a worker thread while the event loop keeps answering requests. Both jobs fire
at start-up and then every hour / minute; every fire is a row in ``jobrunner_executions``.

To run:
    make venv        # once: creates .venv with jobrunner[dev] (APScheduler, FastAPI, uvicorn)
    .venv/bin/uvicorn examples.apscheduler_fastapi:app
    curl -s localhost:8000/health        # {"status":"ok"} at once, even mid-cleanup
    curl -s localhost:8000/executions    # what the scheduler ran, newest first

It writes ``apscheduler_example.db`` in the current directory; set JOBRUNNER_DATABASE_URL
(e.g. ``postgresql://user@localhost/app``) to use PostgreSQL instead.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI, Request
from pydantic import BaseModel

from jobrunner import AsyncJobRunner, PhasedJob
from jobrunner.contrib.apscheduler import aclose_runners, configure, schedule


class RefreshRates(PhasedJob):
    """Async: awaits an exchange-rate API (simulated) and returns the rates."""

    name = "example.refresh_rates"
    timeout = 30

    class Args(BaseModel):
        base: str = "EUR"

    async def execute(self, args: Args) -> dict[str, Any]:
        await asyncio.sleep(0.1)  # an awaited HTTP call in a real app
        return {"base": args.base, "USD": 1.08}


class PurgeSoftDeleted(PhasedJob):
    """Sync and blocking: deletes old rows and garbage-collects files (simulated)."""

    name = "example.purge_soft_deleted"
    timeout = 600  # a hung run ends timed_out; it never blocks the next fire forever

    class Args(BaseModel):
        retention_days: int = 30

    def execute(self, args: Args) -> dict[str, int]:
        time.sleep(2)  # sync SQL and S3 calls; this runs in a worker thread, not on the loop
        return {"retention_days": args.retention_days, "deleted": 0}


def database_url() -> str:
    """JOBRUNNER_DATABASE_URL, else a SQLite file next to where the app runs."""
    return os.environ.get("JOBRUNNER_DATABASE_URL", "sqlite:///apscheduler_example.db")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the scheduler with the app; on shutdown let running fires finish, then close."""
    url = database_url()
    configure(url)  # what every fire uses; the URL never goes into the job store
    runner = AsyncJobRunner(url)
    await runner.create_schema()  # quick start; use `jobrunner migrate` in production
    app.state.runner = runner

    scheduler = AsyncIOScheduler()
    now = datetime.now(UTC)  # fire once at start-up, then on the interval
    schedule(scheduler, RefreshRates, "interval", {"base": "EUR"}, id="refresh-rates",
             minutes=1, next_run_time=now)
    schedule(scheduler, PurgeSoftDeleted, "interval", {"retention_days": 30},
             id="purge-soft-deleted", hours=1, next_run_time=now)
    scheduler.start()
    try:
        yield
    finally:
        scheduler.pause()  # no new fires
        await aclose_runners()  # fires in flight finish and are recorded (30 s at most)
        scheduler.shutdown()
        await runner.aclose()


app = FastAPI(title="jobrunner + APScheduler", lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    """Answers at once: no scheduled job ever holds the event loop."""
    return {"status": "ok"}


@app.get("/executions")
async def executions(request: Request, limit: int = 20) -> list[dict[str, Any]]:
    """The latest executions, newest first."""
    runner: AsyncJobRunner = request.app.state.runner
    return [
        {
            "id": str(e.id),
            "job": e.job,
            "status": e.status.value,
            "triggered_by": e.triggered_by,
            "schedule": e.external_id,
            "created_at": e.created_at.isoformat(),
            "duration_ms": e.duration_ms,
            "result": e.result,
        }
        for e in await runner.list(limit=limit)
    ]


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app)
