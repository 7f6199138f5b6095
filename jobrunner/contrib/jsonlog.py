"""Structured logs: one JSON object per line, with the execution each record is about.

Every record jobrunner logs about an execution carries ``execution_id``, ``job``,
``attempt`` and ``phase`` as ``extra`` fields; :class:`ExecutionContext` adds them to
records that lack them (your own ``logger.info`` inside a phase included), from the phase
running in that thread or task. :class:`JsonFormatter` prints a record as one JSON
object. ``jobrunner worker --log-format json`` uses both::

    handler = logging.StreamHandler()
    handler.addFilter(ExecutionContext())
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from .._monitor import current_phase

__all__ = ["FIELDS", "ExecutionContext", "JsonFormatter"]

#: The fields of every line about an execution (None when a record is about none).
FIELDS = ("execution_id", "job", "attempt", "phase")

# Attributes every LogRecord has: what is left over came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class ExecutionContext(logging.Filter):
    """Adds ``execution_id``, ``job``, ``attempt`` and ``phase`` of the phase running here
    to records that do not carry them (it never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = current_phase.get()
        if info is None:
            return True
        values = {
            "execution_id": info.execution_id,
            "job": info.job,
            "attempt": info.state.number,
            "phase": info.phase,
        }
        for name, value in values.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, the
    execution fields, every other ``extra`` field, ``exception`` when there is one, and
    ``trace_id``/``span_id`` when OpenTelemetry has a span current."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            line[name] = getattr(record, name, None)
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in line:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        line.update(_trace_ids())
        return json.dumps(line, default=str, ensure_ascii=False)


def _trace_ids() -> dict[str, str]:
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # never imported here: only if the application uses it
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
