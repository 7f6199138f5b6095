"""Templates and how values look on the page.

Autoescaping is on for every template, whatever its extension: args, results, job
names and error messages are data and always render as text. Large values are cut
here, server-side, so a page never carries a megabyte of traceback.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from ._security import CSRF_COOKIE, Csrf, actor

#: Characters of a traceback, args or result shown inline; the rest behind "show all".
TEXT_LIMIT = 20_000
#: Values longer than this are folded (click to open).
FOLD_AT = 400


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ago=ago, when=when, ms=ms, capped=capped, pretty=pretty, short=short, tail=tail
    )
    return env


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``3 min ago`` / ``in 5 s``; an empty string for None."""
    if moment is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            text = f"{seconds / size:.0f} {unit}"
            break
    else:
        text = f"{seconds:.0f} s"
    return f"in {text}" if future else f"{text} ago"


def when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ms(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value:.2f} ms"
    return f"{value:,.1f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"


def capped(value: int, cap: int) -> str:
    return f"{cap:,}+" if value > cap else f"{value:,}"


def pretty(value: Any) -> str:
    """A value as indented JSON (as stored; never executed or interpreted)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def short(value: uuid.UUID | str) -> str:
    return str(value)[:8]


def tail(text: str | None, limit: int = TEXT_LIMIT) -> str:
    """The last ``limit`` characters (a traceback ends with what went wrong)."""
    if text is None:
        return ""
    return text if len(text) <= limit else text[-limit:]


class Renderer:
    """Renders a page with what every page needs: the mount root, the user, CSRF."""

    def __init__(self, csrf: Csrf, *, read_only: bool, title: str) -> None:
        self.env = environment()
        self.csrf = csrf
        self.read_only = read_only
        self.title = title

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        token = None if self.read_only else self.csrf.token_for(request)
        html = self.env.get_template(name).render(
            root=request.scope.get("root_path", "").rstrip("/"),
            path=request.url.path,
            here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            user=actor(request),
            read_only=self.read_only,
            csrf_token=token,
            title=self.title,
            now=datetime.now(UTC),
            flash=request.query_params.get("done", "")[:200],
            **context,
        )
        response = HTMLResponse(html, status)
        if token is not None and request.cookies.get(CSRF_COOKIE) != token:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                httponly=True,
                samesite="strict",
                path=request.scope.get("root_path", "") or "/",
                secure=request.url.scheme == "https",
            )
        return response
