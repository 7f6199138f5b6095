"""The ``jobrunner`` command: inspect and operate executions."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ._engine import database_url
from ._records import Execution

app = typer.Typer(help="Inspect and operate jobrunner executions.", no_args_is_help=True)
console = Console()

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


def executions_table(executions: list[Execution], title: str = "executions") -> Table:
    """A rich table of executions for people."""
    table = Table(title=title)
    for column in (
        "id",
        "job",
        "status",
        "attempt",
        "triggered by",
        "started",
        "duration",
        "error",
    ):
        table.add_column(column, overflow="fold")
    for e in executions:
        style = _STATUS_STYLE.get(e.status.value, "")
        duration = f"{e.duration_ms:.1f} ms" if e.duration_ms is not None else "-"
        started = e.started_at.strftime("%Y-%m-%d %H:%M:%S") if e.started_at else "-"
        error = f"{e.error_type}: {e.error_message}" if e.error_type else ""
        table.add_row(
            str(e.id)[:8],
            e.job,
            f"[{style}]{e.status.value}[/]",
            str(e.attempt),
            e.triggered_by,
            started,
            duration,
            error[:80],
        )
    return table


@app.callback()
def _root() -> None:
    """Inspect and operate jobrunner executions."""


@app.command()
def demo(
    database_url_opt: str = typer.Option(
        None, "--database-url", envvar="JOBRUNNER_DATABASE_URL", help="Where to store executions."
    ),
) -> None:
    """Run two example jobs (one succeeds, one fails after retries) and show the table."""
    from ._demo import run_demo

    url = str(database_url(database_url_opt))
    executions = run_demo(url)
    console.print(f"Ran the demo jobs on [bold]{url}[/]:")
    console.print(executions_table(executions))
    console.print(
        "Every attempt of the failing job is in the ledger: `jobrunner show <id>` (see docs)."
    )


def main() -> None:
    """Entry point of the console script."""
    app()
