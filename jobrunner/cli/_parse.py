"""Command-line values: windows like 1h or 30d, statuses, ``--args`` JSON, execution ids."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import _queries as q
from .._errors_db import framework_sql
from .._exceptions import ExecutionNotFound
from .._runner import JobRunner
from .._schema import ExecutionStatus
from ._errors import BadInput

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
IdArgument = Annotated[
    str, typer.Argument(metavar="ID", help="Execution id, or its first 4+ hex digits.")
]

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


def parse_statuses(values: Sequence[str] | None) -> list[ExecutionStatus] | None:
    """``--status`` values, repeated or comma-separated; ``None`` when not given."""
    if not values:
        return None
    known = [s.value for s in ExecutionStatus if s is not ExecutionStatus.ABANDONED]
    wanted = [v.strip().lower() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in known]
    if unknown:
        raise BadInput(
            f"invalid --status {unknown[0]!r}; an execution's status is one of: {', '.join(known)}"
        )
    return [ExecutionStatus(v) for v in wanted]


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
