"""The ``jobrunner`` command: inspect and operate executions.

Global options go before the command: ``jobrunner --database-url URL --app myapp.jobs
list``. Every command takes ``--json`` for scripts (one JSON document on stdout).
Errors print one line on stderr (``--debug`` shows the traceback). Exit codes: 0 done;
1 an error (unreachable database, unknown execution or job, a run that did not
succeed, a failed check); 2 bad input on the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from . import _migrate
from . import _queries as q
from ._engine import database_url, display_url, is_memory_sqlite, make_sync_engine, parse_url
from ._errors_db import framework_sql
from ._exceptions import (
    ConfigurationError,
    ExecutionNotFound,
    JobRunnerError,
    SchemaMissing,
)
from ._job import PHASES, PhasedJob
from ._records import Attempt, Execution, JobStats
from ._registry import default_registry
from ._runner import AsyncJobRunner, JobRunner
from ._schema import ExecutionStatus

logger = logging.getLogger(__name__)

console = Console()
err_console = Console(stderr=True)

_STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "running": "cyan",
    "retrying": "yellow",
    "pending": "white",
    "cancelled": "magenta",
    "abandoned": "red",
}
_TERMINAL = ", ".join(sorted(s.value for s in ExecutionStatus if s.is_terminal))


P = ParamSpec("P")
T = TypeVar("T")

_debug = contextvars.ContextVar("jobrunner_cli_debug", default=False)


class BadInput(ValueError):
    """A command-line value that does not parse (exit code 2, nothing touched)."""


@dataclasses.dataclass(kw_only=True)
class _Settings:
    url: str | None


def _one_line_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn any error into one line on stderr and an exit code; ``--debug`` re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if _debug.get():
                raise
            message, code = _describe(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from None

    return wrapper


def _describe(exc: Exception) -> tuple[str, int]:
    """One line and an exit code for ``exc``."""
    if isinstance(exc, BadInput):
        return _one_line(str(exc)), 2
    if isinstance(exc, JobRunnerError):
        return _one_line(str(exc)), 1
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {_one_line(str(getattr(exc, 'orig', None) or exc))}", 1
    return f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (--debug shows where)", 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


app = typer.Typer(
    help="Inspect and operate jobrunner executions.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


# -- global options, logging, apps ---------------------------------------------------------


@app.callback()
@_one_line_errors
def _root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="JOBRUNNER_DATABASE_URL",
            metavar="URL",
            help="Execution store (default: sqlite:///jobrunner.db).",
            show_default=False,
        ),
    ] = None,
    apps: Annotated[
        list[str] | None,
        typer.Option(
            "--app",
            "-A",
            envvar="JOBRUNNER_APP",
            metavar="MODULE",
            help="Module defining your jobs, imported so they register (repeatable).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what runs.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Debug logs and tracebacks.")] = False,
) -> None:
    """Inspect and operate jobrunner executions."""
    ctx.obj = _Settings(url=url)
    _debug.set(debug)
    _configure_logging(
        ctx, logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    )
    _import_apps(apps or [])


class _LineFormatter(logging.Formatter):
    """``warning: message`` lines; tracebacks only when asked for."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {record.getMessage()}"
        if self.tracebacks and record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _configure_logging(ctx: typer.Context, level: int) -> None:
    """Print jobrunner's log records as plain lines on stderr for this command only."""
    log = logging.getLogger("jobrunner")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(tracebacks=level == logging.DEBUG))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]

    ctx.call_on_close(restore)


def _import_apps(apps: Sequence[str]) -> None:
    """Import the ``--app`` modules so their jobs register in the default registry."""
    names = [name for value in apps for name in re.split(r"[,\s]+", value) if name]
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project's own modules
    for name in names:
        module = name.partition(":")[0]
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot import --app module {module!r}: {type(exc).__name__}: {exc}"
            ) from exc


def _settings(ctx: typer.Context) -> _Settings:
    settings = ctx.find_object(_Settings)
    return settings if settings is not None else _Settings(url=None)


def _url(ctx: typer.Context) -> str:
    return str(database_url(_settings(ctx).url))


def _engine_options(url: str) -> dict[str, Any]:
    """Fail fast instead of hanging on an unreachable PostgreSQL host."""
    parsed = parse_url(url, is_async=False)
    if parsed.get_backend_name() == "postgresql":
        return {"connect_args": {"connect_timeout": 10}}
    if not is_memory_sqlite(parsed) and not Path(str(parsed.database)).exists():
        raise SchemaMissing(
            f"there is no SQLite database at {parsed.database}; run `jobrunner migrate` "
            "to create it (or `jobrunner demo` to try jobrunner out)"
        )
    return {}


@contextlib.contextmanager
def _runner(ctx: typer.Context) -> Iterator[JobRunner]:
    url = _url(ctx)
    with JobRunner(url, **_engine_options(url)) as runner:
        yield runner


# -- parsing command-line values --------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_window(text: str, option: str) -> timedelta | datetime:
    """``30m``, ``1h``, ``7d``, ``2w``, ``1h30m`` back from now, or an ISO date/datetime."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if parts and "".join(n + u for n, u in parts) == compact:
        return sum((timedelta(**{_UNITS[u]: float(n)}) for n, u in parts), timedelta())
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(
            f"invalid {option} {text!r}: expected a duration like 30m, 1h, 7d, 2w or 1h30m, "
            "or an ISO date like 2024-05-01"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _statuses(values: Sequence[str] | None) -> list[ExecutionStatus] | None:
    if not values:
        return None
    try:
        return [ExecutionStatus(v.strip().lower()) for value in values for v in value.split(",")]
    except ValueError as exc:
        known = ", ".join(s.value for s in ExecutionStatus)
        raise BadInput(f"invalid --status: {exc}; statuses are: {known}") from None


def _job_args(text: str) -> dict[str, Any]:
    """``--args``: a JSON object, inline or ``@file.json``."""
    source = "--args"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise BadInput(f"cannot read --args file {source!r}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise BadInput(f"{source} must be a JSON object like '{{\"id\": 1}}', not {value!r}")
    return value


def _execution_id(runner: JobRunner, text: str) -> uuid.UUID:
    """A full execution id, or a unique prefix of one as the tables print (8 digits)."""
    with contextlib.suppress(ValueError):
        return uuid.UUID(text)
    digits = text.strip().replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{4,32}", digits):
        raise BadInput(f"{text!r} is not an execution id: give the UUID or its first 4+ hex digits")
    with framework_sql(runner.url), runner.engine.connect() as conn:
        ids = q.find_ids_by_prefix(conn, digits)
    if not ids:
        raise ExecutionNotFound(f"no execution id starts with {text!r}")
    if len(ids) > 1:
        raise ExecutionNotFound(f"more than one execution id starts with {text!r}; give more")
    return ids[0]


# -- output ---------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (no colour, no wrapping)."""
    typer.echo(json.dumps(document, default=_default, indent=2))


def execution_json(execution: Execution) -> dict[str, Any]:
    """An execution as JSON: every column, plus ``duration_ms``."""
    return {**dataclasses.asdict(execution), "duration_ms": execution.duration_ms}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _status(status: ExecutionStatus) -> Text:
    return Text(status.value, style=_STATUS_STYLE.get(status.value, ""))


def _error(error_type: str | None, message: str | None, limit: int = 120) -> Text:
    return Text(f"{error_type}: {message}"[:limit] if error_type else "", style="red")


def _table(title: str, columns: Sequence[str], *, folding: Sequence[str]) -> Table:
    """A compact table: short columns never wrap, ``folding`` ones take what is left."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in columns:
        if column in folding:
            table.add_column(column, overflow="fold", min_width=min(len(column), 6))
        else:
            table.add_column(column, no_wrap=True)
    return table


def executions_table(executions: list[Execution], title: str = "executions") -> Table:
    """A rich table of executions for people (times in UTC)."""
    table = _table(
        title,
        ("id", "status", "job / error", "attempt", "duration", "started (UTC)", "triggered by"),
        folding=("job / error", "triggered by", "started (UTC)"),
    )
    # Job names stay whole where they can; the error under them folds.
    table.columns[2].min_width = min(30, max((len(e.job) for e in executions), default=0))
    for e in executions:
        job = Text(e.job)
        if e.error_type:
            job.append("\n").append_text(_error(e.error_type, e.error_message))
        table.add_row(
            str(e.id)[:8],
            _status(e.status),
            job,
            f"{e.attempt}/{e.max_attempts}",
            _ms(e.duration_ms),
            _when(e.started_at),
            Text(e.triggered_by),
        )
    return table


def attempts_table(attempts: list[Attempt]) -> Table:
    """The attempt ledger of one execution for people."""
    table = _table(
        "attempts",
        ("#", "status", "phase", "from", "started (UTC)", "load / execute / record", "error"),
        folding=("started (UTC)", "load / execute / record", "error"),
    )
    for a in attempts:
        table.add_row(
            str(a.number),
            _status(a.status),
            a.phase or "-",
            a.resumed_from,
            _when(a.started_at),
            f"{_ms(a.load_ms)} / {_ms(a.execute_ms)} / {_ms(a.record_ms)}",
            _error(a.error_type, a.error_message),
        )
    return table


def _details(e: Execution) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("id", str(e.id)),
        ("job", Text(f"{e.job}  ({e.handler})")),
        ("status", Text.assemble(_status(e.status), f"  phase: {e.phase or '-'}")),
        ("attempt", f"{e.attempt} of {e.max_attempts}"),
        ("triggered by", Text(e.triggered_by)),
        ("worker", Text(e.worker or "-")),
        ("created", _when(e.created_at) + " UTC"),
        ("started", _when(e.started_at)),
        ("finished", _when(e.finished_at)),
        ("duration", _ms(e.duration_ms)),
        (
            "phases",
            f"load {_ms(e.load_ms)} · execute {_ms(e.execute_ms)} · record {_ms(e.record_ms)}",
        ),
        ("max loop lag", _ms(e.max_loop_lag_ms)),
        ("args", Text(json.dumps(e.args, default=_default))),
        ("checkpoint", Text(json.dumps(e.result, default=_default)) if e.checkpointed else "-"),
    ]
    optional = {
        "next retry": _when(e.next_retry_at) if e.next_retry_at else None,
        "idempotency key": e.idempotency_key,
        "external id": e.external_id,
        "concurrency key": e.concurrency_key,
        "cancel requested": "yes" if e.cancel_requested else None,
        "error": f"{e.error_type}: {e.error_message}" if e.error_type else None,
    }
    rows += [(key, Text(value)) for key, value in optional.items() if value]
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _print_execution(execution: Execution, message: str, as_json: bool) -> None:
    if as_json:
        emit_json({"execution": execution_json(execution)})
    else:
        console.print(Text(message))


JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
IdArgument = Annotated[
    str, typer.Argument(metavar="ID", help="Execution id, or its first 4+ hex digits.")
]


# -- reading ------------------------------------------------------------------------------------


@app.command("list")
@_one_line_errors
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
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List executions, newest first."""
    statuses = _statuses(status)
    window = parse_window(since, "--since") if since else None
    with _runner(ctx) as runner:
        executions = runner.list(status=statuses, job=job, since=window, limit=limit)
    if as_json:
        emit_json({"executions": [execution_json(e) for e in executions]})
    elif executions:
        console.print(executions_table(executions))
    else:
        console.print("No executions match.")


@app.command()
@_one_line_errors
def show(ctx: typer.Context, execution_id: IdArgument, as_json: JsonOption = False) -> None:
    """Everything about one execution, then its attempt ledger."""
    with _runner(ctx) as runner:
        execution = runner.get(_execution_id(runner, execution_id))
        ledger = runner.attempts(execution.id)
    if as_json:
        emit_json(
            {
                "execution": execution_json(execution),
                "attempts": [dataclasses.asdict(a) for a in ledger],
            }
        )
        return
    console.print(_details(execution))
    if execution.error_traceback:
        console.print(Text(execution.error_traceback.rstrip(), style="dim"))
    console.print(attempts_table(ledger) if ledger else "No attempts recorded yet.")


@app.command()
@_one_line_errors
def attempts(ctx: typer.Context, execution_id: IdArgument, as_json: JsonOption = False) -> None:
    """The attempt ledger of one execution, oldest first."""
    with _runner(ctx) as runner:
        eid = _execution_id(runner, execution_id)
        ledger = runner.attempts(eid)
    if as_json:
        emit_json({"execution_id": eid, "attempts": [dataclasses.asdict(a) for a in ledger]})
    else:
        console.print(attempts_table(ledger) if ledger else "No attempts recorded yet.")


@app.command()
@_one_line_errors
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
    with _runner(ctx) as runner:
        rows = runner.stats(window)
    if as_json:
        emit_json({"since": since, "stats": [dataclasses.asdict(r) for r in rows]})
        return
    console.print(_stats_table(rows, since) if rows else f"No executions in the window ({since}).")


def _stats_table(rows: list[JobStats], since: str) -> Table:
    table = _table(
        f"executions created in the window ({since})",
        ("job", "status", "count", "p50", "p95"),
        folding=("job",),
    )
    for column in table.columns[2:]:
        column.justify = "right"
    for r in rows:
        table.add_row(Text(r.job), _status(r.status), str(r.count), _ms(r.p50_ms), _ms(r.p95_ms))
    return table


@app.command()
@_one_line_errors
def jobs(as_json: JsonOption = False) -> None:
    """Registered jobs: handler path, phases, retry policy, timeout."""
    registered = list(default_registry)
    if as_json:
        emit_json({"jobs": [_job_json(job) for job in registered]})
    elif registered:
        console.print(_jobs_table(registered))
    else:
        console.print("No jobs registered; pass the module defining them with --app.")


def _phases(job: type[PhasedJob]) -> str:
    return ", ".join(
        f"{p} (async)" if job.spec.is_async(p) else p for p in PHASES if job.spec.runs(p)
    )


def _job_json(job: type[PhasedJob]) -> dict[str, Any]:
    policy = job.retry
    return {
        "name": job.name,
        "handler": job.handler,
        "phases": [p for p in PHASES if job.spec.runs(p)],
        "async_phases": sorted(job.spec.async_phases),
        "retry": {
            "max_attempts": policy.max_attempts,
            "wait_initial": policy.wait_initial,
            "wait_max": policy.wait_max,
            "multiplier": policy.multiplier,
            "jitter": policy.jitter,
            "retry_on": [_qualname(e) for e in policy.retry_on],
            "give_up_on": [_qualname(e) for e in policy.give_up_on],
        },
        "timeout": job.timeout,
        "load_timeout": job.load_timeout,
        "record_timeout": job.record_timeout,
        "args_schema": job.Args.model_json_schema() if job.Args is not None else None,
    }


def _qualname(exc: type[BaseException] | str) -> str:
    return exc if isinstance(exc, str) else f"{exc.__module__}.{exc.__qualname__}"


def _jobs_table(registered: list[type[PhasedJob]]) -> Table:
    table = _table(
        "jobs",
        ("name", "handler", "phases", "retry", "timeout"),
        folding=("name", "handler", "phases", "retry"),
    )
    for job in registered:
        timeout = f"{job.timeout:g}s" if job.timeout is not None else "-"
        table.add_row(
            Text(job.name), Text(job.handler), _phases(job), job.retry.describe(), timeout
        )
    return table


# -- operating ------------------------------------------------------------------------------


@app.command()
@_one_line_errors
def retry(ctx: typer.Context, execution_id: IdArgument, as_json: JsonOption = False) -> None:
    """Put a failed, timed-out, cancelled or abandoned execution back to pending."""
    with _runner(ctx) as runner:
        execution = runner.retry(_execution_id(runner, execution_id), triggered_by="cli")
    _print_execution(
        execution,
        f"Execution {execution.id} of {execution.job} is pending again "
        f"(up to attempt {execution.max_attempts}); a worker will pick it up.",
        as_json,
    )


@app.command()
@_one_line_errors
def cancel(ctx: typer.Context, execution_id: IdArgument, as_json: JsonOption = False) -> None:
    """Cancel an execution: at once if waiting, at its next checkpoint if running."""
    with _runner(ctx) as runner:
        execution = runner.cancel(_execution_id(runner, execution_id))
    if execution.status is ExecutionStatus.CANCELLED:
        message = f"Execution {execution.id} of {execution.job} is cancelled."
    else:
        message = (
            f"Execution {execution.id} of {execution.job} is running; cancel requested, "
            "its worker stops it at the next checkpoint."
        )
    _print_execution(execution, message, as_json)


@app.command()
@_one_line_errors
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
    as_json: JsonOption = False,
) -> None:
    """Delete finished executions and their attempts, in short batches."""
    cutoff = parse_window(older_than, "--older-than")
    statuses = _statuses(status)
    with _runner(ctx) as runner, _progress() as progress:
        task = progress.add_task("pruning", deleted=0)
        deleted = runner.prune(
            cutoff,
            status=statuses,
            batch_size=batch_size,
            progress=lambda n: progress.update(task, deleted=n),
        )
    if as_json:
        emit_json({"deleted": deleted, "older_than": older_than})
    else:
        console.print(f"Pruned {deleted} execution(s) finished more than {older_than} ago.")


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}: {task.fields[deleted]} deleted"),
        console=err_console,
        transient=True,
    )


_REAP_BATCH = 100


@app.command()
@_one_line_errors
def reap(
    ctx: typer.Context,
    lease_timeout: Annotated[
        float | None,
        typer.Option(
            "--lease-timeout",
            metavar="SECONDS",
            help="Seconds without a heartbeat before a running execution counts as abandoned "
            "(default: three heartbeat intervals).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Recover executions whose worker died: retry or fail them per their policy."""
    reaped: list[Execution] = []
    with _runner(ctx) as runner:
        while True:  # reaped executions leave `running`, so each round finds new ones
            batch = runner.reap(lease_timeout=lease_timeout, limit=_REAP_BATCH)
            reaped += batch
            if len(batch) < _REAP_BATCH:
                break
    if as_json:
        emit_json({"reaped": [execution_json(e) for e in reaped]})
    elif reaped:
        console.print(executions_table(reaped, title="reaped executions"))
    else:
        console.print("No abandoned executions.")


@app.command()
@_one_line_errors
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
    payload = _job_args(args)
    job_cls = default_registry.resolve(job)
    url = _url(ctx)
    options = _engine_options(url)
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


# -- checking and migrating -------------------------------------------------------------------


@app.command()
@_one_line_errors
def check(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Check the database schema and that every registered job imports by its handler path."""
    results = [_check_database(_url(ctx)), *_check_jobs()]
    ok = all(passed for _, passed, _ in results)
    if as_json:
        emit_json({"ok": ok, "checks": [{"name": n, "ok": p, "detail": d} for n, p, d in results]})
    else:
        for name, passed, detail in results:
            mark = Text("ok  ", style="green") if passed else Text("FAIL", style="bold red")
            console.print(Text.assemble(mark, f" {name}: {detail}"))
    if not ok:
        raise typer.Exit(1)


def _check_database(url: str) -> tuple[str, bool, str]:
    name = f"database {display_url(url)}"
    try:
        current, differences = _schema_state(url)
    except JobRunnerError as exc:
        return name, False, _one_line(str(exc))
    head = _migrate.head_revision()
    if current == head and not differences:
        return name, True, f"schema at revision {head} (newest)"
    if current is None and not differences:
        return name, True, "schema matches (made by create_schema(); `jobrunner migrate` adopts it)"
    if current is None:
        return name, False, "jobrunner tables missing or incomplete; run `jobrunner migrate`"
    if current != head:
        return (
            name,
            False,
            f"schema at revision {current}, newest is {head}; run `jobrunner migrate`",
        )
    return name, False, f"schema at {head} but differs from this version: {differences[0]!r}"


def _schema_state(url: str) -> tuple[str | None, list[Any]]:
    """The database's jobrunner revision and how its tables differ from this version."""
    engine = make_sync_engine(url, **_engine_options(url))
    try:
        with framework_sql(display_url(url)), engine.connect() as conn:
            return _migrate.current_revision(conn), _migrate.schema_differences(conn)
    finally:
        engine.dispose()


def _check_jobs() -> list[tuple[str, bool, str]]:
    registered = list(default_registry)
    if not registered:
        return [("jobs", False, "no jobs registered; pass the module defining them with --app")]
    return [(f"job {job.name}", *_importable(job)) for job in registered]


def _importable(job: type[PhasedJob]) -> tuple[bool, str]:
    """Whether a worker in another process finds ``job`` by its handler path."""
    module_name, _, qualname = job.handler.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception as exc:
        return False, f"{job.handler} does not import: {type(exc).__name__}: {exc}"
    if target is not job:
        return False, f"{job.handler} imports a different class than the registered one"
    return True, job.handler


@app.command()
@_one_line_errors
def migrate(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option("--revision", help="Target revision.")] = "head",
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the SQL instead of running it (for review).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create or upgrade jobrunner's tables (Alembic, idempotent)."""
    url = _url(ctx)
    if sql:
        typer.echo(_migrate.migration_sql(url, revision=revision))
        return
    steps: list[dict[str, str]] = []

    def on_step(rev: str, description: str) -> None:
        steps.append({"revision": rev, "description": description})
        if not as_json:
            err_console.print(Text.assemble(("  applied ", "green"), f"{rev}  {description}"))

    where = display_url(url)
    with err_console.status(f"Migrating {where} to {revision} …"):
        _migrate.migrate(url, revision=revision, on_step=on_step)
    if as_json:
        emit_json({"database": where, "applied": steps})
    elif steps:
        console.print(Text(f"Migrated {where}: {len(steps)} revision(s) applied."))
    else:
        console.print(Text(f"{where} is already up to date; nothing to do."))


@app.command()
@_one_line_errors
def demo(
    ctx: typer.Context,
    database_url_opt: Annotated[
        str | None,
        typer.Option(
            "--database-url", envvar="JOBRUNNER_DATABASE_URL", help="Where to store executions."
        ),
    ] = None,
) -> None:
    """Run two example jobs (one succeeds, one fails after retries) and show the table."""
    from ._demo import run_demo

    url = str(database_url(database_url_opt or _settings(ctx).url))
    executions = run_demo(url)
    console.print(f"Ran the demo jobs on [bold]{display_url(url)}[/]:")
    console.print(executions_table(executions))
    console.print(
        "Every attempt of the failing job is in the ledger: "
        f"`jobrunner show {str(executions[-1].id)[:8]}`."
    )


def main() -> None:
    """Entry point of the console script."""
    app()
