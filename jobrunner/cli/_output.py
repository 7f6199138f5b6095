"""What the commands print: JSON documents for scripts; the consoles rich writes to."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from .._job import PHASES, PhasedJob
from .._records import Execution

console = Console()
err_console = Console(stderr=True)


def json_default(value: Any) -> Any:
    """UUIDs and datetimes as strings, durations as seconds."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout (no colour, no wrapping; UTF-8 text as is)."""
    typer.echo(json.dumps(_rounded(document), default=json_default, indent=2, ensure_ascii=False))


def _rounded(value: Any, key: str = "") -> Any:
    """Durations to the microsecond (``65.8505``, not ``65.85050000000001``)."""
    if isinstance(value, dict):
        return {k: _rounded(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, key) for v in value]
    if isinstance(value, float) and key.endswith(("_ms", "_s")):
        return round(value, 3 if key.endswith("_ms") else 6)
    return value


def execution_json(execution: Execution) -> dict[str, Any]:
    """An execution as JSON: every column, plus ``duration_ms``."""
    return {**dataclasses.asdict(execution), "duration_ms": execution.duration_ms}


def job_json(job: type[PhasedJob]) -> dict[str, Any]:
    """A registered job as JSON: handler, phases, retry policy, timeouts, args schema."""
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


def print_execution(execution: Execution, message: str, as_json: bool) -> None:
    """The execution as JSON, or ``message`` for people."""
    if as_json:
        emit_json({"execution": execution_json(execution)})
    else:
        console.print(Text(message))
