"""The POST side: retry, cancel, bulk retry, pause and resume a queue.

Refused with 403 when the dashboard is read-only, when the CSRF token is missing or
wrong, or when the browser says the form came from another origin. Each action goes
through the runner's own verb with the user as ``actor``, which writes the audit row
in the action's transaction.
"""

from __future__ import annotations

import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from .._exceptions import ExecutionNotFound, InvalidTransition
from . import _filters
from . import _queries as q
from ._render import Renderer
from ._security import CSRF_FIELD, Csrf, actor
from ._store import Store

#: A bulk retry moves at most this many executions per click.
BULK_LIMIT = 500
#: Forms are small; anything bigger is not ours.
MAX_FORM_BYTES = 65_536
#: Statuses a bulk retry picks from ("the failed set").
BULK_STATUSES = ("failed", "timed_out")


class Actions:
    """The operator actions of one dashboard (all refused when it is read-only)."""

    def __init__(self, store: Store, renderer: Renderer, csrf: Csrf, *, read_only: bool) -> None:
        self.store = store
        self.render = renderer
        self.csrf = csrf
        self.read_only = read_only

    async def _form(self, request: Request) -> list[tuple[str, str]] | Response:
        """The form's fields, or the response refusing the request."""
        if self.read_only:
            return PlainTextResponse(
                "read-only dashboard: actions are off (create_app(read_only=False) or "
                "`jobrunner web --actions`)\n",
                403,
            )
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return PlainTextResponse("form too large\n", 413)
        fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        token = next((v for k, v in fields if k == CSRF_FIELD), None)
        if not _same_origin(request) or not self.csrf.check(request, token):
            return PlainTextResponse(
                "CSRF check failed: reload the page and submit its form again\n", 403
            )
        return fields

    def _back(self, request: Request, where: str, done: str) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        joiner = "&" if "?" in where else "?"
        return RedirectResponse(f"{root}{where}{joiner}{urlencode({'done': done})}", 303)

    async def retry(self, request: Request) -> Response:
        return await self._one(request, "retry", "retried")

    async def cancel(self, request: Request) -> Response:
        return await self._one(request, "cancel", "cancel requested")

    async def _one(self, request: Request, verb: str, done: str) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        text = request.path_params["id"]
        try:
            execution_id = uuid.UUID(text)
            await self.store.call(verb, execution_id, actor=actor(request))
        except (ValueError, ExecutionNotFound):
            return self.render.page(
                request,
                "error.html",
                404,
                nav="executions",
                message=f"no execution with id {text[:80]}",
            )
        except InvalidTransition as exc:
            return self.render.page(request, "error.html", 409, nav="executions", message=str(exc))
        return self._back(request, f"/executions/{execution_id}", done)

    async def bulk_retry(self, request: Request) -> Response:
        """Retry the failed executions the submitted filters match (up to BULK_LIMIT)."""
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        try:
            filters = _filters.parse([(k, v) for k, v in form if k != CSRF_FIELD])
        except _filters.BadFilter as exc:
            return self.render.page(request, "error.html", 400, nav="executions", message=str(exc))
        ids = await self.store.read(q.retryable_ids, filters, BULK_STATUSES, BULK_LIMIT)
        retried = 0
        for execution_id in ids:
            try:
                await self.store.call("retry", execution_id, actor=actor(request))
                retried += 1
            except (InvalidTransition, ExecutionNotFound):
                continue  # changed meanwhile (retried by someone else, pruned)
        return self._back(request, f"/executions?{filters.query()}", f"retried {retried}")

    async def pause(self, request: Request) -> Response:
        return await self._queue(request, "pause_queue", "paused")

    async def resume(self, request: Request) -> Response:
        return await self._queue(request, "resume_queue", "resumed")

    async def _queue(self, request: Request, verb: str, done: str) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        name = request.path_params["name"]
        if not name.strip() or len(name) > 100:
            return self.render.page(
                request,
                "error.html",
                400,
                nav="queues",
                message="a queue name has 1 to 100 characters",
            )
        await self.store.call(verb, name, actor=actor(request))
        return self._back(request, "/queues", f"{done} {name}")


def _same_origin(request: Request) -> bool:
    """False when the browser says the request came from another origin.

    Behind a proxy that rewrites ``Host``, its ``X-Forwarded-Host`` names the origin (a
    cross-site form cannot set that header, so trusting it costs no CSRF safety).
    """
    origin = request.headers.get("origin")
    if origin is None:
        return True
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")}
    return urlsplit(origin).netloc in hosts - {""}
