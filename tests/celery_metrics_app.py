"""The test Celery app measured for Prometheus: `celery -A tests.celery_metrics_app worker`.

Run with ``PROMETHEUS_MULTIPROC_DIR`` set: each prefork child writes its samples there,
and the test aggregates them as a scraper's process would.
"""

from __future__ import annotations

from jobrunner.contrib.prometheus import instrument

from .celery_app import app, jobs

__all__ = ["app", "jobs"]

# Installed before any runner exists: the children's runners, made on first use, take it.
instrument()
