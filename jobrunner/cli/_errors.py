"""One line on stderr and an exit code for every error; ``--debug`` shows the traceback."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from sqlalchemy.exc import SQLAlchemyError

from .._engine import redact
from .._exceptions import JobRunnerError

P = ParamSpec("P")
T = TypeVar("T")

debug = contextvars.ContextVar("jobrunner_cli_debug", default=False)


class BadInput(ValueError):
    """A command-line value that does not parse (exit code 2, nothing touched)."""


def one_line_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn any error into one line on stderr and an exit code; ``--debug`` re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if debug.get():
                raise
            message, code = _describe(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from None

    return wrapper


def _describe(exc: Exception) -> tuple[str, int]:
    """One line and an exit code for ``exc``."""
    if isinstance(exc, BadInput):
        return one_line(str(exc)), 2
    if isinstance(exc, JobRunnerError):
        return one_line(str(exc)), 1
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {one_line(str(getattr(exc, 'orig', None) or exc))}", 1
    return f"unexpected {type(exc).__name__}: {one_line(str(exc))} (--debug shows where)", 1


def one_line(text: str) -> str:
    """``text`` on one line (every run of whitespace as one space), passwords hidden."""
    return redact(" ".join(text.split()))
