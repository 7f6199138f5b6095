"""The GET side: overview, executions, one execution, jobs, queues, the event stream."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse

from .. import _queries as core
from .._exceptions import ExecutionNotFound
from .._lifecycle import RETRYABLE_BY_HAND
from . import _filters, _svg
from . import _queries as q
from ._live import Changes
from ._render import TEXT_LIMIT, Renderer, pretty
from ._store import Store

#: The jobs page's windows, as the CLI writes them.
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
#: Overview numbers are shared by every page open for this long (one query set, many tabs).
OVERVIEW_TTL_S = 2.0
#: The first hex digits of an id (at least 4), as the CLI's tables show them.
_PREFIX = re.compile(r"[0-9a-fA-F]{4,32}")


class Pages:
    """The read-only pages of one dashboard."""

    def __init__(self, store: Store, renderer: Renderer, changes: Changes) -> None:
        self.store = store
        self.render = renderer
        self.changes = changes
        self._overview: tuple[float, int, dict[str, Any]] | None = None

    def _known_queues(self) -> set[str]:
        return {job.queue for job in self.store.runner.registry}

    async def overview(self, request: Request) -> Response:
        now = datetime.now(UTC)
        data = await self._overview_data(now)
        chart = _svg.per_minute_chart(data["per_minute"], int(now.timestamp()) // 60)
        return self.render.page(
            request,
            "overview.html",
            nav="overview",
            chart=chart,
            cap=q.COUNT_CAP,
            window_rows=q.WINDOW_ROWS,
            **data,
        )

    async def _overview_data(self, now: datetime) -> dict[str, Any]:
        # Shared for a moment, but never across an announced change: a page refreshed
        # by an event must show what the event announced.
        cached, version = self._overview, self.changes.version
        fresh = cached is not None and time.monotonic() - cached[0] < OVERVIEW_TTL_S
        if cached is not None and fresh and cached[1] == version:
            return cached[2]
        data = await self.store.read(q.overview, now, self._known_queues())
        self._overview = (time.monotonic(), version, data)
        return data

    async def executions(self, request: Request) -> Response:
        try:
            filters = _filters.parse(list(request.query_params.multi_items()))
        except _filters.BadFilter as exc:
            return self.render.page(request, "error.html", 400, nav="executions", message=str(exc))
        page = await self.store.read(q.list_page, filters)
        return self.render.page(
            request,
            "executions.html",
            nav="executions",
            f=filters,
            page=page,
            statuses=_filters.STATUSES,
            sorts=_filters.SORTS,
            retryable=[s for s in RETRYABLE_BY_HAND if s != "cancelled"],
        )

    async def execution(self, request: Request) -> Response:
        text = request.path_params["id"]
        execution_id = _parse_id(text)
        if execution_id is None and _PREFIX.fullmatch(text):
            # A short id, as the CLI prints them: go to the one execution it names.
            found = await self.store.read(core.find_ids_by_prefix, text, limit=2)
            if len(found) == 1:
                root = request.scope.get("root_path", "").rstrip("/")
                return RedirectResponse(f"{root}/executions/{found[0]}", 302)
        try:
            if execution_id is None:
                raise ExecutionNotFound("not an execution id")
            execution = await self.store.call("get", execution_id)
        except ExecutionNotFound:
            return self.render.page(
                request,
                "error.html",
                404,
                nav="executions",
                message=f"no execution with id {request.path_params['id'][:80]}",
            )
        attempts = await self.store.call("attempts", execution_id)
        audit = await self.store.call("audit", execution_id, limit=50)
        return self.render.page(
            request,
            "execution.html",
            nav="executions",
            e=execution,
            attempts=attempts,
            audit=audit,
            timeline=_svg.timeline(attempts),
            text_limit=TEXT_LIMIT,
            retryable=execution.status.value in RETRYABLE_BY_HAND,
            cancellable=execution.status.value in ("pending", "retrying", "running"),
        )

    async def raw(self, request: Request) -> Response:
        """One large field of one execution, whole, as text/plain (never rendered)."""
        execution_id = _parse_id(request.path_params["id"])
        field = request.path_params["field"]
        if execution_id is None or field not in ("args", "result", "traceback"):
            return PlainTextResponse("not found\n", 404)
        value = await self.store.read(q.raw_field, execution_id, field)
        text = value if isinstance(value, str) or value is None else pretty(value)
        return PlainTextResponse(text or "", headers={"content-disposition": "inline"})

    async def jobs(self, request: Request) -> Response:
        window = request.query_params.get("window", "24h")
        if window not in WINDOWS:
            window = "24h"
        since = datetime.now(UTC) - WINDOWS[window]
        stats = await self.store.read(q.phase_percentiles, since)
        jobs = list(self.store.runner.registry)
        return self.render.page(
            request,
            "jobs.html",
            nav="jobs",
            jobs=jobs,
            stats=stats,
            window=window,
            windows=list(WINDOWS),
            phases=q.PHASES,
            window_rows=q.percentile_rows(self.store.dialect),
        )

    async def queues(self, request: Request) -> Response:
        rows = await self.store.read(q.queue_rows, datetime.now(UTC), self._known_queues())
        return self.render.page(request, "queues.html", nav="queues", queues=rows, cap=q.COUNT_CAP)

    async def events(self, request: Request) -> Response:
        """Server-sent events: ``change`` whenever executions were created, started or ended."""

        async def stream() -> AsyncIterator[str]:
            yield "retry: 3000\n\n"
            async for version in self.changes.subscribe():
                if version is None:
                    yield ": keepalive\n\n"
                else:
                    yield f"event: {'change' if version else 'ready'}\ndata: {version}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )


def _parse_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
