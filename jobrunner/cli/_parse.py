"""Command-line values: windows like 1h or 30d, statuses, ``--args`` JSON, execution ids."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import _queries as q
from .. import _typed as typed
from .._errors_db import framework_sql
from .._exceptions import ExecutionNotFound
from .._runner import JobRunner
from .._schema import ExecutionStatus
from ._errors import BadInput

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
IdArgument = Annotated[
    str, typer.Argument(metavar="ID", help="Execution id, or its first 4+ hex digits.")
]


def parse_window(text: str, option: str) -> timedelta | datetime:
    """``30m``, ``1h``, ``7d``, ``2w``, ``1h30m`` back from now, or an ISO date/datetime."""
    try:
        return typed.window(text)
    except ValueError as exc:
        raise BadInput(f"invalid {option} {text!r}: {exc}") from None


def parse_statuses(values: Sequence[str] | None) -> list[ExecutionStatus] | None:
    """``--status`` values, repeated or comma-separated; ``None`` when not given."""
    if not values:
        return None
    try:
        return [ExecutionStatus(v) for v in typed.statuses(values)]
    except ValueError as exc:
        raise BadInput(f"invalid --status {exc}") from None


def parse_job_args(text: str) -> dict[str, Any]:
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


def parse_execution_id(runner: JobRunner, text: str) -> uuid.UUID:
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
