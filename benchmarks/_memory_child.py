"""One memory measurement in a fresh process: RSS before and after many no-op executions.

``python -m benchmarks._memory_child URL RUNNER N WARMUP CONCURRENCY`` prints one JSON object:
RSS (MB) at start, after ``WARMUP`` executions, every tenth of the way, and at the end.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from typing import Any

from jobrunner import AsyncJobRunner, JobRunner, Registry

from ._jobs import AsyncNoop, SyncNoop, run_many

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process in MB, after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _sync(url: str, n: int, warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_start_mb": rss_mb(), "curve": []}
    runner = JobRunner(url, registry=Registry([SyncNoop]))
    runner.create_schema()
    for _ in range(warmup):
        runner.run(SyncNoop)
    out["rss_warm_mb"] = rss_mb()
    start, step = time.perf_counter(), max(1, n // 10)
    for i in range(1, n + 1):
        runner.run(SyncNoop)
        if i % step == 0:
            out["curve"].append([i, rss_mb()])
    out["seconds"] = time.perf_counter() - start
    runner.close()
    out["rss_end_mb"] = rss_mb()
    return out


async def _async(url: str, n: int, warmup: int, concurrency: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rss_start_mb": rss_mb(), "curve": []}
    runner = AsyncJobRunner(url, registry=Registry([AsyncNoop]), pool_size=concurrency)
    await runner.create_schema()
    await run_many(lambda: runner.run(AsyncNoop), warmup, concurrency)
    out["rss_warm_mb"] = rss_mb()
    seconds, done, step = 0.0, 0, max(1, n // 10)
    while done < n:
        chunk = min(step, n - done)
        seconds += await run_many(lambda: runner.run(AsyncNoop), chunk, concurrency)
        done += chunk
        out["curve"].append([done, rss_mb()])
    out["seconds"] = seconds
    await runner.aclose()
    out["rss_end_mb"] = rss_mb()
    return out


def main(argv: list[str]) -> None:
    # gc.collect() before each RSS reading holds the loop on purpose; don't log it as lag.
    logging.getLogger("jobrunner.loop").setLevel(logging.ERROR)
    url, kind, n, warmup, concurrency = argv[0], argv[1], *map(int, argv[2:5])
    if kind == "sync":
        result = _sync(url, n, warmup)
    else:
        result = asyncio.run(_async(url, n, warmup, concurrency))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
