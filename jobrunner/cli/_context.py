"""Global options: settings, logging, ``--app`` imports, the registry and the runner."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from .._engine import database_url, is_memory_sqlite, parse_url, redact
from .._exceptions import ConfigurationError, SchemaMissing
from .._registry import Registry
from .._runner import JobRunner
from ._errors import debug as debug_flag
from ._errors import one_line_errors


@dataclasses.dataclass(kw_only=True)
class Settings:
    """What the global options leave for the command (on ``ctx.obj``)."""

    url: str | None
    #: ``--app`` modules not imported yet: imported when a command first needs the jobs,
    #: so a module that fails to import blocks neither ``--help`` nor ``list``.
    apps: list[str] = dataclasses.field(default_factory=list)


@one_line_errors
def root(
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
    ctx.obj = Settings(url=url, apps=list(apps or []))
    debug_flag.set(debug)
    _configure_logging(
        ctx, logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    )


class _LineFormatter(logging.Formatter):
    """``warning: message`` lines; tracebacks only when asked for."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()}: {redact(record.getMessage())}"
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


def registry(ctx: typer.Context | None = None, *, required: bool = True) -> Registry:
    """The registry the commands read: ``jobrunner.cli.default_registry``.

    Imports the ``--app`` modules first (once). When one fails to import, ``required``
    commands (they run or check jobs) fail with the import error; the others (they
    read or change rows) say so in a warning and go on without those jobs.
    """
    settings_ = ctx.find_object(Settings) if ctx is not None else None
    if settings_ is not None and settings_.apps:
        apps, settings_.apps = settings_.apps, []
        try:
            _import_apps(apps)
        except ConfigurationError as exc:
            if required:
                raise
            logging.getLogger("jobrunner").warning("%s; going on without its jobs", exc)
    # Read from the package at call time, so replacing that one attribute (as the tests
    # do) reaches every command.
    from . import default_registry

    return default_registry


def settings(ctx: typer.Context) -> Settings:
    """The global options, or their defaults when a command runs without the callback."""
    found = ctx.find_object(Settings)
    return found if found is not None else Settings(url=None)


def resolve_url(ctx: typer.Context) -> str:
    """The database URL: ``--database-url``, ``JOBRUNNER_DATABASE_URL`` or the default."""
    return str(database_url(settings(ctx).url))


def engine_options(url: str, *, is_async: bool = False) -> dict[str, Any]:
    """Fail fast instead of hanging on an unreachable PostgreSQL host.

    Only for sync runners: psycopg's ``connect_timeout`` is no asyncpg argument, and an
    AsyncJobRunner's options also build its sync engine (asyncpg times out by itself).
    """
    parsed = parse_url(url, is_async=False)
    if parsed.get_backend_name() == "postgresql":
        return {} if is_async else {"connect_args": {"connect_timeout": 10}}
    if not is_memory_sqlite(parsed) and not Path(str(parsed.database)).exists():
        raise SchemaMissing(
            f"there is no SQLite database at {parsed.database}; run `jobrunner migrate` "
            "to create it (or `jobrunner demo` to try jobrunner out)"
        )
    return {}


@contextlib.contextmanager
def open_runner(ctx: typer.Context) -> Iterator[JobRunner]:
    """A sync runner on the command's database, closed when the command ends."""
    url = resolve_url(ctx)
    jobs = registry(ctx, required=False)
    with JobRunner(url, registry=jobs, **engine_options(url)) as runner:
        yield runner
