"""``jobrunner web``: serve the dashboard on its own (uvicorn)."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import typer

from .._exceptions import ConfigurationError
from .._runner import JobRunner
from ._context import _import_apps, engine_options, registry, resolve_url
from ._errors import one_line_errors


@one_line_errors
def web(
    ctx: typer.Context,
    apps: Annotated[
        list[str] | None,
        typer.Option(
            "--app",
            "-A",
            metavar="MODULE",
            help="Module defining your jobs, for the jobs page (repeatable; also global).",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (others can reach it only if set).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to bind.")] = 8080,
    actions: Annotated[
        bool,
        typer.Option(
            "--actions",
            help="Offer retry, cancel, bulk retry and queue pause/resume (read-only without).",
        ),
    ] = False,
) -> None:
    """Serve the dashboard: overview, executions, jobs and queues, live.

    Read-only unless --actions. Set JOBRUNNER_WEB_USER and JOBRUNNER_WEB_PASSWORD to
    require Basic auth (do, before binding anything but localhost).
    """
    try:
        import uvicorn

        from ..web import create_app
    except ImportError as exc:
        raise ConfigurationError(
            f"jobrunner web needs {exc.name}: pip install 'jobrunner[web]'"
        ) from exc
    _import_apps(apps or [])
    url = resolve_url(ctx)
    if not _is_loopback(host) and not os.environ.get("JOBRUNNER_WEB_PASSWORD"):
        typer.echo(
            f"warning: serving on {host} without JOBRUNNER_WEB_USER/JOBRUNNER_WEB_PASSWORD: "
            "anyone who reaches this port can see every execution's args and errors",
            err=True,
        )
    runner = JobRunner(url, registry=registry(ctx), **engine_options(url))
    app = create_app(runner, read_only=not actions)
    mode = "with actions" if actions else "read-only"
    typer.echo(f"jobrunner dashboard ({mode}) on http://{host}:{port}/", err=True)
    try:
        # Open pages hold event streams that never end: give them a moment, then go.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        runner.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
