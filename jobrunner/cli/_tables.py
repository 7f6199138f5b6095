"""Rich tables for people: executions, attempts, one execution's details, stats, jobs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from rich import box
from rich.table import Table
from rich.text import Text

from .._job import PHASES, PhasedJob
from .._queries import STATS_COUNT_CAP, STATS_SAMPLE
from .._records import Attempt, Execution, JobStats
from .._schema import ExecutionStatus
from ._output import console, json_default

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


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _status(status: ExecutionStatus) -> Text:
    return Text(status.value, style=_STATUS_STYLE.get(status.value, ""))


def _error(error_type: str | None, message: str | None, limit: int = 240) -> Text:
    """The error, shortened at a word boundary with an ellipsis (``show`` has it whole)."""
    if not error_type:
        return Text("")
    text = f"{error_type}: {message}"
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return Text(text, style="red")


def _json_text(value: object) -> str:
    """JSON for people: non-ASCII text as itself, not as ``\\u`` escapes."""
    return json.dumps(value, default=json_default, ensure_ascii=False)


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


#: Below these widths a column goes: first "triggered by", then the date of "started".
_WIDE, _MEDIUM = 110, 90


def executions_table(
    executions: list[Execution], title: str = "executions", *, width: int | None = None
) -> Table:
    """A rich table of executions for people (times in UTC), fitted to ``width``.

    Narrow terminals get fewer columns rather than wrapped ones: ``triggered by`` goes
    below 110 columns and ``started`` loses its year below 90. Errors fold under the
    job name, shortened at a word boundary.
    """
    width = width or console.width
    columns = ["id", "status", "job / error", "attempt", "duration", "started (UTC)"]
    if width >= _WIDE:
        columns.append("triggered by")
    table = _table(title, columns, folding=("job / error", "triggered by"))
    # Job names stay whole where they can (long ones fold when narrow); errors fold.
    longest = max((len(e.job) for e in executions), default=0)
    table.columns[2].min_width = min(30 if width >= _MEDIUM else 16, longest)
    started = "%Y-%m-%d %H:%M:%S" if width >= _MEDIUM else "%m-%d %H:%M:%S"
    for e in executions:
        job = Text(e.job)
        if e.error_type:
            job.append("\n").append_text(_error(e.error_type, e.error_message))
        cells: list[str | Text] = [
            str(e.id)[:8],
            _status(e.status),
            job,
            f"{e.attempt}/{e.max_attempts}",
            _ms(e.duration_ms),
            e.started_at.strftime(started) if e.started_at else "-",
        ]
        if width >= _WIDE:
            cells.append(Text(e.triggered_by))
        table.add_row(*cells)
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


#: Longer values are shortened in ``show`` unless ``--full`` is given.
SHOWN_CHARACTERS = 2_000


def shorten(text: str, *, full: bool = False, limit: int = SHOWN_CHARACTERS) -> str:
    """``text``, or its start and how much was left out (``--full`` shows all)."""
    if full or len(text) <= limit:
        return text
    return f"{text[:limit]} … ({len(text) - limit:,} more characters; --full shows all)"


def details(e: Execution, *, full: bool = False) -> Table:
    """Everything about one execution, a field a row (long values shortened)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("id", str(e.id)),
        ("job", Text(f"{e.job}  ({e.handler})")),
        ("status", Text.assemble(_status(e.status), f"  phase: {e.phase or '-'}")),
        ("attempt", f"{e.attempt} of {e.max_attempts}"),
        ("triggered by", Text(e.triggered_by)),
        ("queue", Text(f"{e.queue}  (priority {e.priority})")),
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
        ("args", Text(shorten(_json_text(e.args), full=full))),
        (
            "checkpoint",
            Text(shorten(_json_text(e.result), full=full)) if e.checkpointed else "-",
        ),
    ]
    optional = {
        "due": _when(e.due_at) if e.status.value in ("pending", "retrying") else None,
        "lease expires": _when(e.lease_expires_at) if e.status.value == "running" else None,
        "dispatch": (
            f"{e.dispatch} (message sent {_when(e.dispatched_at)})"
            if e.dispatch and e.dispatched_at
            else f"{e.dispatch} (message not sent yet)"
            if e.dispatch
            else None
        ),
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


def stats_table(rows: list[JobStats], since: str) -> Table:
    """Counts and p50/p95 durations per job and status."""
    table = _table(
        f"executions created in the window ({since})",
        ("job", "status", "count", "p50", "p95"),
        folding=("job",),
    )
    for column in table.columns[2:]:
        column.justify = "right"
    for r in rows:
        count = f"{r.count:,}+" if r.capped else f"{r.count:,}"
        table.add_row(Text(r.job), _status(r.status), count, _ms(r.p50_ms), _ms(r.p95_ms))
    if any(r.capped or r.sampled for r in rows):
        table.caption = (
            f"counts stop at {STATS_COUNT_CAP:,} (shown {STATS_COUNT_CAP:,}+); p50/p95 are "
            f"over the newest {STATS_SAMPLE:,} executions of each job and status"
        )
    return table


def jobs_table(registered: list[type[PhasedJob]]) -> Table:
    """Registered jobs: name, handler, phases, retry policy, timeout."""
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


def _phases(job: type[PhasedJob]) -> str:
    return ", ".join(
        f"{p} (async)" if job.spec.is_async(p) else p for p in PHASES if job.spec.runs(p)
    )
