"""The Celery app the test workers run: ``celery -A tests.celery_app worker``.

Configured from the environment the test sets: ``JOBRUNNER_TEST_BROKER`` (a Redis URL),
``JOBRUNNER_TEST_QUEUE`` and ``JOBRUNNER_DATABASE_URL``. Every event loop created in the
process is counted (pid, thread) so the tests can check the one-loop-per-process promise.
"""

from __future__ import annotations

import asyncio.base_events
import os
import threading
from typing import Any

from celery import Celery

from jobrunner.contrib.celery import install

from .celery_jobs import Tick

# -- count every event loop this process creates ----------------------------------------------

LOOPS_CREATED: list[tuple[int, str]] = []
_original_init = asyncio.base_events.BaseEventLoop.__init__


def _counting_init(self: asyncio.base_events.BaseEventLoop, *args: Any, **kwargs: Any) -> None:
    LOOPS_CREATED.append((os.getpid(), threading.current_thread().name))
    _original_init(self, *args, **kwargs)


asyncio.base_events.BaseEventLoop.__init__ = _counting_init  # type: ignore[method-assign]


def loops_here() -> list[str]:
    """Names of the threads that created event loops in this process."""
    return [thread for pid, thread in LOOPS_CREATED if pid == os.getpid()]


# -- the app ------------------------------------------------------------------------------------

QUEUE = os.environ.get("JOBRUNNER_TEST_QUEUE", "jobrunner-test")
BROKER = os.environ.get("JOBRUNNER_TEST_BROKER", "redis://127.0.0.1:6379/0")

app = Celery("jobrunner_tests", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    worker_enable_remote_control=False,  # no pidbox: other runs' broadcasts can't reach us
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
# Every retry wait goes through the broker as a countdown (none is slept in the worker).
jobs = install(app, inline_retry_max_wait=0)
jobs.add_periodic(Tick, {"n": 1}, schedule=0.5, name="tick")
