"""The Celery app of the throughput comparison: a no-op task, results in PostgreSQL.

Configured from the environment so a worker subprocess (``celery -A benchmarks._celery_app
worker``) sees the same settings: ``JOBRUNNER_BENCH_BROKER`` (Redis) and
``JOBRUNNER_BENCH_RESULT_BACKEND`` (``db+postgresql+psycopg://...``, SQLAlchemy's backend).
"""

from __future__ import annotations

import os

from celery import Celery

IDLE_QUEUE = "jobrunner-bench-idle"

app = Celery(
    "jobrunner_bench",
    broker=os.environ.get("JOBRUNNER_BENCH_BROKER", "redis://127.0.0.1:6379/14"),
    backend=os.environ.get("JOBRUNNER_BENCH_RESULT_BACKEND"),
)
app.conf.update(
    task_default_queue=IDLE_QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=False,
)


@app.task(name="bench.noop")
def noop() -> None:
    """Does nothing; the worker stores its SUCCESS row in the result database."""
    return None
