"""``jobrunner worker``: run executions as they come due, until SIGTERM."""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from .._hooks import uninstall
from .._registry import Registry
from .._runner import AsyncJobRunner, JobRunner
from ._context import engine_options, registry, resolve_url
from ._errors import one_line_errors


class LogFormat(enum.StrEnum):
    """How the worker prints its log records."""

    TEXT = "text"
    JSON = "json"


class RunnerKind(enum.StrEnum):
    """Which runner the worker uses."""

    AUTO = "auto"
    SYNC = "sync"
    ASYNC = "async"


@one_line_errors
def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Executions run at once.")
    ] = 8,
    queues: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", metavar="QUEUE", help="Only these queues (repeatable)."),
    ] = None,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Exit once nothing is due and nothing runs.")
    ] = False,
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            min=0.01,
            metavar="SECONDS",
            help="Poll this often; PostgreSQL NOTIFY wakes the worker at once anyway.",
        ),
    ] = 1.0,
    grace_period: Annotated[
        float,
        typer.Option(
            "--grace-period",
            min=0,
            metavar="SECONDS",
            help="On SIGTERM/SIGINT, let running executions finish this long.",
        ),
    ] = 30.0,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            "--heartbeat-interval",
            min=0.01,
            metavar="SECONDS",
            help="Renew leases this often; a lease lasts three heartbeats.",
        ),
    ] = 10.0,
    runner_kind: Annotated[
        RunnerKind,
        typer.Option(
            "--runner",
            help="sync: JobRunner, no event loop; async: AsyncJobRunner; auto: async "
            "when a registered job has async phases.",
        ),
    ] = RunnerKind.AUTO,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics at http://0.0.0.0:PORT/metrics "
            "(needs jobrunner[prometheus]).",
        ),
    ] = None,
    log_format: Annotated[
        LogFormat,
        typer.Option("--log-format", help="text: one line per record; json: one object per line."),
    ] = LogFormat.TEXT,
) -> None:
    """Run due executions, CONCURRENCY at a time, until SIGTERM or SIGINT.

    Claims only what it can start now, wakes on PostgreSQL NOTIFY, reaps expired leases
    (one worker at a time), and on SIGTERM finishes what runs within the grace period,
    claims nothing new and exits 0. Logs one line per execution (``--log-format json``:
    one JSON object per line, with the execution's id, job, attempt and phase).
    """
    logging.getLogger("jobrunner").setLevel(
        min(logging.getLogger("jobrunner").level or logging.INFO, logging.INFO)
    )
    if log_format is LogFormat.JSON:
        _json_logs()
    url = resolve_url(ctx)
    if metrics_port is not None:
        ctx.call_on_close(_serve_metrics(url, metrics_port))
    jobs = registry(ctx)
    use_async = runner_kind is RunnerKind.ASYNC or (
        runner_kind is RunnerKind.AUTO and any(job.spec.async_phases for job in jobs)
    )
    options: dict[str, Any] = {
        "concurrency": concurrency,
        "queues": queues or None,
        "until_idle": until_idle,
        "poll_interval": poll_interval,
        "grace_period": grace_period,
        "handle_signals": True,
    }
    if use_async:
        asyncio.run(_work_async(url, jobs, heartbeat_interval, options))
        return
    with JobRunner(
        url, registry=jobs, heartbeat_interval=heartbeat_interval, **engine_options(url)
    ) as runner:
        runner.work(**options)


async def _work_async(
    url: str, jobs: Registry, heartbeat_interval: float, options: dict[str, Any]
) -> None:
    async with AsyncJobRunner(
        url,
        registry=jobs,
        heartbeat_interval=heartbeat_interval,
        **engine_options(url, is_async=True),
    ) as runner:
        await runner.work(**options)


def _json_logs() -> None:
    """JSON lines for jobrunner's records, and for the application's (root) records."""
    from ..contrib.jsonlog import ExecutionContext, JsonFormatter

    log = logging.getLogger("jobrunner")
    root = logging.getLogger()
    if not root.handlers:  # the jobs' own log records, with their execution's fields
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(min(root.level, logging.INFO))
    for handler in (*log.handlers, *root.handlers):
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ExecutionContext())


def _serve_metrics(url: str, port: int) -> Callable[[], None]:
    """Measure this process's runners and serve /metrics; returns what stops serving."""
    from ..contrib import prometheus

    metrics = prometheus.instrument()
    collector = prometheus.DatabaseCollector(url)
    prometheus.REGISTRY.register(collector)
    server = prometheus.serve(port)
    logging.getLogger("jobrunner.worker").info(
        "serving Prometheus metrics on port %d at /metrics", server.port
    )

    def stop() -> None:
        server.close()
        prometheus.REGISTRY.unregister(collector)
        collector.close()
        uninstall(metrics)

    return stop
