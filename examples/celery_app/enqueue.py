"""Enqueue one sync and one async job, wait for the worker to run them, print the outcome.

To run: start the worker first (see app.py), then ``python enqueue.py``.
"""

from __future__ import annotations

import time

from app import queue
from jobs import CountWords, FetchGreeting

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


def main(timeout: float = 60.0) -> int:
    runner = queue.runner
    runner.create_schema()  # quick start; use `jobrunner migrate`/Alembic in production
    ids = [
        queue.enqueue(CountWords, {"text": "the quick brown fox"}),
        queue.enqueue(FetchGreeting, {"who": "celery"}),
    ]
    deadline = time.monotonic() + timeout
    while True:
        executions = [runner.get(i) for i in ids]
        if all(e.status.value in TERMINAL for e in executions):
            break
        if time.monotonic() > deadline:
            print("timed out waiting for the worker; is it running? (see app.py)")
            return 1
        time.sleep(0.1)
    for e in executions:
        print(f"{e.job}: {e.status.value} -> {e.result!r} (celery task {e.external_id})")
    return 0 if all(e.succeeded for e in executions) else 1


if __name__ == "__main__":
    raise SystemExit(main())
