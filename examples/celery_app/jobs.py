"""The example's two jobs: one sync, one async. Neither knows about Celery."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from jobrunner import PhasedJob, RetryPolicy


class CountWords(PhasedJob):
    """Sync: the worker runs it with JobRunner, and no event loop exists for it."""

    name = "example.count_words"

    class Args(BaseModel):
        text: str

    def execute(self, args: Args) -> dict[str, int]:
        return {"words": len(args.text.split())}


class FetchGreeting(PhasedJob):
    """Async: runs on the worker process's one event loop; no loop code anywhere here."""

    name = "example.fetch_greeting"
    retry = RetryPolicy(max_attempts=3, wait_initial=2, retry_on=(ConnectionError,))

    class Args(BaseModel):
        who: str

    async def load(self, session: Any, args: Args) -> str:
        # Session A: read inputs; committed and closed before execute starts.
        now = (await session.execute(sa.select(sa.func.current_timestamp()))).scalar()
        return f"{args.who} (asked at {now})"

    async def execute(self, who: str) -> str:
        await asyncio.sleep(0.05)  # the slow network call, with no session held
        return f"hello, {who}"
