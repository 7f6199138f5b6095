"""The example Celery app: ``install`` registers jobrunner's one task; beat adds a tick.

To run: from this folder, with Redis on localhost and the virtualenv active::

    celery -A app worker --pool=prefork --concurrency=2 --loglevel=INFO   # the worker
    celery -A app beat --loglevel=INFO                                    # periodic jobs
    python enqueue.py                                                     # send some jobs

Settings come from the environment: ``CELERY_BROKER_URL`` (default
``redis://localhost:6379/0``), ``JOBRUNNER_DATABASE_URL`` (default
``sqlite:///celery_example.db``) and ``CELERY_QUEUE`` (default ``jobrunner-example``).
"""

from __future__ import annotations

import os

from celery import Celery
from jobs import CountWords

from jobrunner.contrib.celery import install

broker = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
app = Celery("celery_example", broker=broker)
app.conf.task_default_queue = os.environ.get("CELERY_QUEUE", "jobrunner-example")

queue = install(
    app, database_url=os.environ.get("JOBRUNNER_DATABASE_URL", "sqlite:///celery_example.db")
)

# Every minute beat sends a tick; the worker that receives it creates and runs an execution.
queue.add_periodic(
    CountWords, {"text": "one more minute"}, schedule=60.0, name="count-every-minute"
)
