"""Commands about the installation: check, migrate, demo."""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer
from rich.text import Text

from .. import _migrate
from .._engine import database_url, display_url, make_sync_engine
from .._errors_db import framework_sql
from .._exceptions import ConfigurationError, JobRunnerError
from .._job import PhasedJob
from ._context import engine_options, registry, resolve_url, settings
from ._errors import one_line, one_line_errors
from ._output import console, emit_json, err_console
from ._parse import JsonOption
from ._tables import executions_table


@one_line_errors
def check(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Check the database schema and that every registered job imports by its handler path."""
    results = [_check_database(resolve_url(ctx)), *_check_jobs(ctx)]
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
        found, differences = _schema_state(url)
    except JobRunnerError as exc:
        return name, False, one_line(str(exc))
    head, current = _migrate.head_revision(), found.revision
    upgrade = "`alembic upgrade heads`" if found.shared else "`jobrunner migrate`"
    where = f" in {found.table}, your Alembic history" if found.shared else ""
    if current == head and not differences:
        return name, True, f"schema at revision {head} (newest{', recorded' + where})"
    if current is None and not differences:
        return name, True, "schema matches (made by create_schema(); `jobrunner migrate` adopts it)"
    if current is None:
        return name, False, "jobrunner tables missing or incomplete; run `jobrunner migrate`"
    if current != head:
        return (
            name,
            False,
            f"schema at revision {current}{where}, newest is {head}; run {upgrade}",
        )
    return name, False, f"schema at {head} but differs from this version: {differences[0]!r}"


def _schema_state(url: str) -> tuple[_migrate.Revision, list[Any]]:
    """The database's jobrunner revision and how its tables differ from this version."""
    engine = make_sync_engine(url, **engine_options(url))
    try:
        with framework_sql(display_url(url)), engine.connect() as conn:
            return _migrate.revision_of(conn), _migrate.schema_differences(conn)
    finally:
        engine.dispose()


def _check_jobs(ctx: typer.Context) -> list[tuple[str, bool, str]]:
    try:
        registered = list(registry(ctx))
    except ConfigurationError as exc:  # an --app module that does not import
        return [("jobs", False, str(exc))]
    if not registered:
        # A readiness probe asks "is the database reachable and migrated?" and nothing
        # more: that passes. Jobs are checked when --app names the modules defining them.
        return [("jobs", True, "none registered; pass --app MODULE to check them too")]
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


@one_line_errors
def migrate(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option("--revision", help="Target revision.")] = "head",
    sql: Annotated[
        bool,
        typer.Option(
            "--sql", help="Print the SQL instead of running it (only what the database lacks)."
        ),
    ] = False,
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="REVISION",
            help="With --sql: the revision to start from ('base': the whole schema).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create or upgrade jobrunner's tables (Alembic, idempotent)."""
    url = resolve_url(ctx)
    if sql:
        typer.echo(_migrate.migration_sql(url, revision=revision, start=start))
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


@one_line_errors
def demo(
    ctx: typer.Context,
    database_url_opt: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Where to store executions (the global --database-url works too).",
        ),
    ] = None,
) -> None:
    """Run two example jobs (one succeeds, one fails after retries) and show the table."""
    from .._demo import run_demo

    # This option, else the global one (which reads JOBRUNNER_DATABASE_URL), else the
    # default: an explicit option always wins over the environment.
    given = database_url_opt if database_url_opt is not None else settings(ctx).url
    url = str(database_url(given))
    executions = run_demo(url)
    console.print(f"Ran the demo jobs on [bold]{display_url(url)}[/]:")
    console.print(executions_table(executions))
    console.print(
        "Every attempt of the failing job is in the ledger: "
        f"`jobrunner show {str(executions[-1].id)[:8]}`."
    )
