"""The executions page's filters as they live in the URL, and its keyset cursor.

Query parameters are named like the CLI's options (``status``, ``job``, ``queue``,
``since``) plus ``until``, ``error`` (text in the error type or message), ``sort``
(``newest`` or ``oldest``), ``limit`` and ``cursor`` (the last row seen, never an
offset). Bad input raises :class:`BadFilter`, shown to the user as a 400 page.
"""

from __future__ import annotations

import base64
import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from .. import _typed as typed

#: Statuses an execution can have (``abandoned`` is an attempt's status only).
STATUSES = typed.STATUSES
SORTS = ("newest", "oldest")
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


class BadFilter(ValueError):
    """A query parameter the dashboard cannot use; the message says which and why."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cursor:
    """The position after which the next page starts: the last row's sort key."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id.hex}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            moment, _, ident = raw.partition("|")
            created = datetime.fromisoformat(moment)
            if created.tzinfo is None:
                raise ValueError("naive time")
            return cls(created_at=created, id=uuid.UUID(hex=ident))
        except (ValueError, UnicodeDecodeError):
            raise BadFilter(f"invalid cursor {text[:40]!r}: follow the page's own links") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Filters:
    """What the executions page shows: every field comes from the URL."""

    status: tuple[str, ...] = ()
    job: str | None = None
    queue: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    error: str | None = None
    sort: str = "newest"
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None
    # The raw text of since/until, to put back in links and forms as typed.
    since_text: str = ""
    until_text: str = ""

    @property
    def newest_first(self) -> bool:
        return self.sort == "newest"

    def query(self, **changes: object) -> str:
        """These filters as a query string, with ``changes`` applied (None drops one)."""
        params: dict[str, object] = {
            "status": ",".join(self.status) or None,
            "job": self.job,
            "queue": self.queue,
            "since": self.since_text or None,
            "until": self.until_text or None,
            "error": self.error,
            "sort": None if self.sort == "newest" else self.sort,
            "limit": None if self.limit == DEFAULT_LIMIT else self.limit,
        }
        params.update(changes)
        return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def parse(params: Mapping[str, str] | Sequence[tuple[str, str]]) -> Filters:
    """Filters from query parameters (``status`` may repeat or be comma-separated)."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    one = {key: value for key, value in items}
    now = datetime.now(UTC)
    since_text = one.get("since", "").strip()
    until_text = one.get("until", "").strip()
    return Filters(
        status=_statuses([v for k, v in items if k == "status"]),
        job=one.get("job", "").strip() or None,
        queue=one.get("queue", "").strip() or None,
        since=_moment(since_text, "since", now),
        until=_moment(until_text, "until", now),
        error=one.get("error", "").strip()[:200] or None,
        sort=_choice(one.get("sort", "newest") or "newest", SORTS, "sort"),
        limit=_limit(one.get("limit", "")),
        cursor=Cursor.decode(one["cursor"]) if one.get("cursor") else None,
        since_text=since_text,
        until_text=until_text,
    )


def _statuses(values: Sequence[str]) -> tuple[str, ...]:
    try:
        return tuple(typed.statuses(values))
    except ValueError as exc:
        raise BadFilter(f"invalid status {exc}") from None


def _moment(text: str, name: str, now: datetime) -> datetime | None:
    """``30m``, ``1h``, ``7d``, ``1h30m`` back from now, or an ISO date/datetime."""
    if not text:
        return None
    try:
        found = typed.window(text)
    except ValueError as exc:
        raise BadFilter(f"invalid {name} {text[:40]!r}: {exc}") from None
    return now - found if isinstance(found, timedelta) else found


def _choice(value: str, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise BadFilter(f"invalid {name} {value[:40]!r}; one of: {', '.join(choices)}")
    return value


def _limit(text: str) -> int:
    if not text:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadFilter(f"invalid limit {text[:40]!r}: a number from 1 to {MAX_LIMIT}")
    return int(text)
