"""Commands that change executions: retry, cancel, prune, reap, run."""

from __future__ import annotations

import asyncio
import getpass
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from .._job import PhasedJob
from .._records import Execution
from .._runner import AsyncJobRunner, JobRunner
from .._schema import ExecutionStatus
from ._context import engine_options, open_runner, registry, resolve_url
from ._errors import one_line_errors
from ._output import console, emit_json, err_console, execution_json, print_execution
from ._parse import (
    IdArgument,
    JsonOption,
    parse_execution_id,
    parse_job_args,
    parse_statuses,
    parse_window,
)
from ._tables import executions_table

_TERMINAL = ", ".join(sorted(s.value for s in ExecutionStatus if s.is_terminal))
_REAP_BATCH = 100


@one_line_errors
def retry(ctx: typer.Context, execution_id: IdArgument, as_json: JsonOption = False) -> None:
    """Put a failed, timed-out or cancelled execution back to pending, due now."""
    with open_runner(ctx) as runner:
        execution = runner.retry(
            parse_execution_id(runner, execution_id), triggered_by="cli", actor=_actor()
        )
    resumes = " (resuming at record: execute already ran)" if execution.checkpointed else ""
    runs_it = (
        f"the {execution.dispatch} relay sends it to {execution.dispatch}"
        if execution.dispatch
        else "`jobrunner worker` runs it"
    )
    print_execution(
        execution,
        f"Execution {execution.id} of {execution.job} is pending again "
        f"(up to attempt {execution.max_attempts}){resumes}; {runs_it}.",
        as_json,
    )


@one_line_errors
def cancel(ctx: typer.Context, execution_id: IdArgument, as_json: JsonOption = False) -> None:
    """Cancel an execution: at once if waiting, at its next checkpoint if running."""
    with open_runner(ctx) as runner:
        execution = runner.cancel(parse_execution_id(runner, execution_id), actor=_actor())
    if execution.status is ExecutionStatus.CANCELLED:
        message = f"Execution {execution.id} of {execution.job} is cancelled."
    else:
        message = (
            f"Execution {execution.id} of {execution.job} is running; cancel requested, "
            "its worker stops it at the next checkpoint."
        )
    print_execution(execution, message, as_json)


@one_line_errors
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="WHEN",
            help="Finished more than 30d/2w/... ago, or before a date.",
        ),
    ],
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status", "-s", metavar="STATUS", help=f"Only these finished statuses ({_TERMINAL})."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=10_000, help="Rows per transaction.")
    ] = 1000,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be deleted.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete finished executions and their attempts, in short batches."""
    cutoff = parse_window(older_than, "--older-than")
    statuses = parse_statuses(status)
    with open_runner(ctx) as runner:
        total = runner.prune(cutoff, status=statuses, dry_run=True)
        deleted = total
        if not dry_run and total:
            with _progress() as progress:
                task = progress.add_task("pruning", total=total)
                deleted = runner.prune(
                    cutoff,
                    status=statuses,
                    batch_size=batch_size,
                    progress=lambda n: progress.update(task, completed=n),
                )
    if as_json:
        emit_json(
            {"deleted": 0 if dry_run else deleted, "would_delete": total, "older_than": older_than}
        )
    elif dry_run:
        console.print(f"{total} execution(s) finished more than {older_than} ago would go.")
    else:
        console.print(f"Pruned {deleted} execution(s) finished more than {older_than} ago.")


def _progress() -> Progress:
    """A bar with the count, the rate and the time left (the total is counted first)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


@one_line_errors
def reap(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Recover executions whose lease expired (their worker died): retry or fail them.

    Leases are on the rows, each of its worker's own length, compared with the
    database's clock: no timeout to give, and a healthy worker is never reaped.
    """
    reaped: list[Execution] = []
    with open_runner(ctx) as runner:
        while True:  # reaped executions leave `running`, so each round finds new ones
            batch = runner.reap(limit=_REAP_BATCH)
            reaped += batch
            if len(batch) < _REAP_BATCH:
                break
    if as_json:
        emit_json({"reaped": [execution_json(e) for e in reaped]})
    elif reaped:
        console.print(executions_table(reaped, title="reaped executions"))
    else:
        console.print("No expired leases: nothing to reap.")


@one_line_errors
def run(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job name or handler path (pkg.module:Class).")],
    args: Annotated[
        str,
        typer.Option(
            "--args", "-a", metavar="JSON", help="Arguments: a JSON object, or @file.json."
        ),
    ] = "{}",
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Run at most once per key.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run a job inline in this process and show how it ended (exit 1 unless it succeeded)."""
    payload = parse_job_args(args)
    job_cls = registry(ctx).resolve(job)
    url = resolve_url(ctx)
    options = engine_options(url)
    if job_cls.spec.async_phases:
        execution = asyncio.run(_run_async(url, job_cls, payload, idempotency_key))
    else:
        with JobRunner(url, **options) as runner:
            execution = runner.run(
                job_cls, payload, idempotency_key=idempotency_key, triggered_by="cli"
            )
    if as_json:
        emit_json({"execution": execution_json(execution)})
    else:
        console.print(executions_table([execution], title=f"ran {job_cls.name}"))
    if not execution.succeeded:
        raise typer.Exit(1)  # the runner already logged why, as one warning line


async def _run_async(
    url: str, job_cls: type[PhasedJob], args: dict[str, Any], idempotency_key: str | None
) -> Execution:
    runner = AsyncJobRunner(url)
    try:
        return await runner.run(job_cls, args, idempotency_key=idempotency_key, triggered_by="cli")
    finally:
        await runner.aclose()


def _actor() -> str:
    """Who the audit records for an action taken from the command line."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return "cli"
