"""AsyncJobRunner on PostgreSQL: many slow async jobs on a small pool, and a sync job
that runs in a worker thread so the event loop keeps serving.

To run:
    make demo                                  # once: creates .venv, installs jobrunner[dev]
    createdb jobs                              # any PostgreSQL database you can write to
    export JOBRUNNER_DATABASE_URL=postgresql://postgres@localhost/jobs
    .venv/bin/python examples/postgres_async.py

One URL serves both drivers: AsyncJobRunner uses asyncpg for async phases and psycopg for
sync ones. The script creates a ``thumbnails`` table of its own (dropped and recreated on
each run) next to jobrunner's tables.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from jobrunner import AsyncJobRunner, PhasedJob

app_metadata = sa.MetaData()
thumbnails = sa.Table(
    "thumbnails",
    app_metadata,
    sa.Column("image_id", sa.Integer, primary_key=True),
    sa.Column("url", sa.String(200)),
    sa.Column("reports", sa.Integer, nullable=False, server_default="0"),
)


class MakeThumbnail(PhasedJob):
    """Async phases: read the row, await a slow service with no connection held, store."""

    name = "images.make_thumbnail"

    class Args(BaseModel):
        image_id: int

    async def load(self, session: AsyncSession, args: Args) -> int:
        query = sa.select(thumbnails.c.image_id).where(thumbnails.c.image_id == args.image_id)
        return int((await session.execute(query)).scalar_one())

    async def execute(self, image_id: int) -> dict[str, Any]:
        await asyncio.sleep(0.5)  # the image service; 0.5 s with no connection checked out
        return {"image_id": image_id, "url": f"https://cdn.example.com/thumbs/{image_id}.webp"}

    async def record(self, session: AsyncSession, result: dict[str, Any]) -> None:
        await session.execute(
            sa.update(thumbnails)
            .where(thumbnails.c.image_id == result["image_id"])
            .values(url=result["url"])
        )


class RenderReport(PhasedJob):
    """A sync execute (a blocking library) under AsyncJobRunner: it runs in a worker thread."""

    name = "images.render_report"

    def execute(self, loaded: Any) -> dict[str, Any]:
        time.sleep(0.3)  # a blocking call: a PDF renderer, boto3, a sync HTTP client
        with self.session() as session:  # a short sync transaction of its own
            session.execute(sa.update(thumbnails).values(reports=thumbnails.c.reports + 1))
        return {"thread": threading.current_thread().name}

    def record(self, session: Session, result: dict[str, Any]) -> None:
        pass  # a sync record also runs in a worker thread, with a sync Session


async def longest_stall(stop: asyncio.Event) -> float:
    """Tick every 10 ms until ``stop``; return the longest gap between ticks, in ms."""
    worst, last = 0.0, time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    return worst * 1000


async def main(url: str) -> None:
    """Run 20 thumbnails and one report; print what happened."""
    async with AsyncJobRunner(url, pool_size=2, max_overflow=0) as runner:
        await runner.create_schema()
        async with runner.engine.begin() as conn:
            await conn.run_sync(app_metadata.drop_all)
            await conn.run_sync(app_metadata.create_all)
            await conn.execute(sa.insert(thumbnails), [{"image_id": i} for i in range(20)])

        started = time.perf_counter()
        executions = await asyncio.gather(
            *(runner.run(MakeThumbnail, {"image_id": i}) for i in range(20))
        )
        elapsed = time.perf_counter() - started
        ok = sum(e.succeeded for e in executions)
        print(f"{MakeThumbnail.name}: {ok}/20 succeeded in {elapsed:.1f} s on a pool of 2")

        stop = asyncio.Event()
        ticker = asyncio.create_task(longest_stall(stop))
        report = await runner.run(RenderReport)
        stop.set()
        print(
            f"{RenderReport.name}: {report.status}; execute ran in thread "
            f"{report.result['thread']!r}, the loop's longest stall was {await ticker:.0f} ms "
            "(300 ms if it had run on the loop)"
        )

        async with runner.engine.connect() as conn:
            finished = sa.select(sa.func.count()).where(
                thumbnails.c.url.is_not(None), thumbnails.c.reports == 1
            )
            done = (await conn.execute(finished)).scalar_one()
        print(f"thumbnails rows with a url and one report: {done}")
        recent = await runner.list(limit=3)
        print("latest executions:", ", ".join(f"{e.job} {e.status}" for e in recent))


if __name__ == "__main__":
    database_url = os.environ.get("JOBRUNNER_DATABASE_URL", "")
    if not database_url.startswith("postgresql"):
        sys.exit(
            "set JOBRUNNER_DATABASE_URL to a PostgreSQL database, e.g. "
            "postgresql://postgres@localhost/jobs"
        )
    asyncio.run(main(database_url))
