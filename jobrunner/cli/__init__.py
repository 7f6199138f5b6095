"""The ``jobrunner`` command: inspect and operate executions.

Global options go before the command: ``jobrunner --database-url URL --app myapp.jobs
list``. Every command takes ``--json`` for scripts (one JSON document on stdout).
Errors print one line on stderr (``--debug`` shows the traceback). Exit codes: 0 done;
1 an error (unreachable database, unknown execution or job, a run that did not
succeed, a failed check); 2 bad input on the command line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import typer
import typer.core
from typer.exceptions import TyperException

# The commands read the registry from here at call time, so this is the one to replace.
from .._registry import default_registry as default_registry
from ._admin import check, demo, migrate
from ._context import root
from ._errors import BadInput, one_line
from ._operate import cancel, prune, reap, retry, run
from ._output import console, emit_json, err_console, execution_json
from ._parse import IdArgument, JsonOption, parse_window
from ._read import attempts, jobs, list_, show, stats
from ._tables import attempts_table, executions_table
from ._web import web
from ._worker import worker

__all__ = [
    "BadInput",
    "IdArgument",
    "JsonOption",
    "app",
    "attempts",
    "attempts_table",
    "cancel",
    "check",
    "console",
    "demo",
    "emit_json",
    "err_console",
    "execution_json",
    "executions_table",
    "jobs",
    "list_",
    "main",
    "migrate",
    "parse_window",
    "prune",
    "reap",
    "retry",
    "run",
    "show",
    "stats",
    "web",
    "worker",
]

logger = logging.getLogger(__name__)


class _Group(typer.core.TyperGroup):
    """The command group: usage errors as one ``error:`` line and exit code 2."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        options: dict[str, Any] = {"prog_name": prog_name, "complete_var": complete_var, **extra}
        if not standalone_mode:
            return super().main(args, standalone_mode=False, **options)
        try:
            outcome = super().main(args, standalone_mode=False, **options)
        except TyperException as exc:  # usage errors: exit code 2
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(outcome if isinstance(outcome, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="Inspect and operate jobrunner executions.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
app.callback()(root)
# Registered in the order `jobrunner --help` lists them.
app.command("list")(list_)
for _command in (
    show,
    attempts,
    stats,
    jobs,
    retry,
    cancel,
    prune,
    reap,
    run,
    worker,
    web,
    check,
    migrate,
    demo,
):
    app.command()(_command)


def main() -> None:
    """Entry point of the console script."""
    app()
