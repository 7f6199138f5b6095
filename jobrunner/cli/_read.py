"""Commands that only read: list, show, attempts, stats, jobs."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.text import Text

from ._context import open_runner, registry
from ._errors import one_line_errors
from ._output import console, emit_json, execution_json, job_json
from ._parse import (
    IdArgument,
    JsonOption,
    parse_execution_id,
    parse_statuses,
    parse_window,
)
from ._tables import attempts_table, details, executions_table, jobs_table, shorten, stats_table


@one_line_errors
def list_(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status", "-s", metavar="STATUS", help="Only these statuses (repeatable or a,b)."
        ),
    ] = None,
    job: Annotated[
        str | None, typer.Option("--job", "-j", metavar="NAME", help="Only this job name.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", metavar="WHEN", help="Created in the last 30m/1h/7d/2w, or since a date."
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, metavar="N", help="At most this many.")
    ] = 50,
    as_json: JsonOption = False,
) -> None:
    """List executions, newest first."""
    statuses = parse_statuses(status)
    window = parse_window(since, "--since") if since else None
    with open_runner(ctx) as runner:
        executions = runner.list(status=statuses, job=job, since=window, limit=limit)
    if as_json:
        emit_json({"executions": [execution_json(e) for e in executions]})
    elif executions:
        console.print(executions_table(executions))
    else:
        console.print("No executions match.")


@one_line_errors
def show(
    ctx: typer.Context,
    execution_id: IdArgument,
    full: Annotated[
        bool, typer.Option("--full", help="Print long args, results and tracebacks whole.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Everything about one execution, then its attempt ledger."""
    with open_runner(ctx) as runner:
        execution = runner.get(parse_execution_id(runner, execution_id))
        ledger = runner.attempts(execution.id)
    if as_json:
        emit_json(
            {
                "execution": execution_json(execution),
                "attempts": [dataclasses.asdict(a) for a in ledger],
            }
        )
        return
    console.print(details(execution, full=full))
    if execution.error_traceback:
        console.print(Text(shorten(execution.error_traceback.rstrip(), full=full), style="dim"))
    console.print(attempts_table(ledger) if ledger else "No attempts recorded yet.")


@one_line_errors
def attempts(ctx: typer.Context, execution_id: IdArgument, as_json: JsonOption = False) -> None:
    """The attempt ledger of one execution, oldest first."""
    with open_runner(ctx) as runner:
        eid = parse_execution_id(runner, execution_id)
        ledger = runner.attempts(eid)
    if as_json:
        emit_json({"execution_id": eid, "attempts": [dataclasses.asdict(a) for a in ledger]})
    else:
        console.print(attempts_table(ledger) if ledger else "No attempts recorded yet.")


@one_line_errors
def stats(
    ctx: typer.Context,
    since: Annotated[
        str,
        typer.Option(
            "--since", metavar="WHEN", help="Window: 30m/1h/7d/2w back, a date, or 'all'."
        ),
    ] = "24h",
    as_json: JsonOption = False,
) -> None:
    """Counts per job and status, with p50/p95 durations, over a window."""
    window = None if since.strip().lower() == "all" else parse_window(since, "--since")
    with open_runner(ctx) as runner:
        rows = runner.stats(window)
    if as_json:
        emit_json({"since": since, "stats": [dataclasses.asdict(r) for r in rows]})
        return
    console.print(stats_table(rows, since) if rows else f"No executions in the window ({since}).")


@one_line_errors
def jobs(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Registered jobs: handler path, phases, retry policy, timeout."""
    registered = list(registry(ctx))
    if as_json:
        emit_json({"jobs": [job_json(job) for job in registered]})
    elif registered:
        console.print(jobs_table(registered))
    else:
        console.print("No jobs registered; pass the module defining them with --app.")
