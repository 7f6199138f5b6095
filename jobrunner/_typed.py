"""Filter values as people type them, read the same by the CLI and the dashboard.

``30m``, ``1h``, ``7d``, ``2w``, ``1h30m`` (a window back from now) or an ISO date; and
statuses, repeated or comma-separated. Errors are ``ValueError`` with what was expected;
each front end says which option or parameter it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from ._schema import ExecutionStatus

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

#: The statuses an execution can have (``abandoned`` is an attempt's only).
STATUSES = tuple(s.value for s in ExecutionStatus if s is not ExecutionStatus.ABANDONED)


def window(text: str) -> timedelta | datetime:
    """A duration back from now (``1h30m``), or an aware moment (ISO, UTC if naive)."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if parts and "".join(n + u for n, u in parts) == compact:
        return sum((timedelta(**{_UNITS[u]: float(n)}) for n, u in parts), timedelta())
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            "expected a duration like 30m, 1h, 7d, 2w or 1h30m, or an ISO date like 2024-05-01"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def statuses(values: Iterable[str]) -> list[str]:
    """Status names, repeated or comma-separated, each once, in the order given."""
    wanted = [v.strip().lower() for value in values for v in value.split(",") if v.strip()]
    for value in wanted:
        if value not in STATUSES:
            raise ValueError(
                f"{value[:40]!r}; an execution's status is one of: {', '.join(STATUSES)}"
            )
    return list(dict.fromkeys(wanted))
