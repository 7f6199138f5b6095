"""``create_app``: the dashboard as a Starlette ASGI app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .._runner import AsyncJobRunner, JobRunner
from ._actions import Actions
from ._live import Changes
from ._pages import Pages
from ._render import Renderer
from ._security import AuthHook, AuthMiddleware, Csrf, basic_auth_from_env
from ._store import Store

STATIC = Path(__file__).parent / "static"


def create_app(
    url_or_runner: str | JobRunner | AsyncJobRunner | None = None,
    *,
    read_only: bool = True,
    auth: AuthHook | None = None,
    routes: Sequence[BaseRoute] = (),
    poll_interval: float = 1.0,
    min_interval: float = 1.0,
    secret: bytes | None = None,
    title: str = "jobrunner",
    metrics: bool | None = None,
) -> Starlette:
    """The dashboard: an ASGI app to serve alone or mount in your own app.

    Args:
        url_or_runner: a database URL (the app makes a :class:`JobRunner` and closes
            it on shutdown), or your own :class:`JobRunner` / :class:`AsyncJobRunner`
            (its ``registry`` lists the jobs page; you close it). Default:
            ``JOBRUNNER_DATABASE_URL``, else ``sqlite:///jobrunner.db``.
        read_only: no actions at all (the default). With False, retry, cancel, bulk
            retry and queue pause/resume are offered, as CSRF-protected POSTs, each
            recorded in ``jobrunner_audit`` with its user.
        auth: your own check: a callable (sync or async) taking the Starlette
            ``Request`` and returning the user's name, or None to refuse with 401
            (raising ``HTTPException`` refuses with its status, ``PermissionError``
            with 403).
            Without it, ``JOBRUNNER_WEB_USER`` and ``JOBRUNNER_WEB_PASSWORD`` turn on
            Basic auth; with neither, anyone who reaches the app may look (and act,
            if not read-only) as ``anonymous``.
        routes: extra routes served beside the pages (e.g. a ``/metrics`` endpoint).
        poll_interval: seconds between checks for changes that live pages show
            (PostgreSQL also wakes on each submit's NOTIFY).
        min_interval: a page refreshes its live parts at most this often (seconds).
        secret: key signing CSRF tokens (default: random per process; pass one to
            share tokens between processes behind a load balancer).
        title: the name in the page header.
        metrics: serve Prometheus metrics at ``/metrics``: this process's registry
            (``prometheus_client.REGISTRY``) plus the database's gauges
            (:class:`jobrunner.contrib.prometheus.DatabaseCollector`), behind the same
            auth as the pages. Default: on when ``prometheus-client`` is installed.
    """
    store = _store(url_or_runner)
    csrf = Csrf(secret)
    renderer = Renderer(csrf, read_only=read_only, title=title)
    changes = Changes(store, poll_interval=poll_interval, min_interval=min_interval)
    pages = Pages(store, renderer, changes)
    actions = Actions(store, renderer, csrf, read_only=read_only)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await changes.stop()
            await store.aclose()

    app = Starlette(
        routes=[
            Route("/", pages.overview, name="overview"),
            Route("/executions", pages.executions, name="executions"),
            Route("/executions/retry", actions.bulk_retry, methods=["POST"], name="bulk_retry"),
            Route("/executions/{id}", pages.execution, name="execution"),
            Route("/executions/{id}/raw/{field}", pages.raw, name="raw"),
            Route("/executions/{id}/retry", actions.retry, methods=["POST"], name="retry"),
            Route("/executions/{id}/cancel", actions.cancel, methods=["POST"], name="cancel"),
            Route("/jobs", pages.jobs, name="jobs"),
            Route("/queues", pages.queues, name="queues"),
            Route("/queues/{name:path}/pause", actions.pause, methods=["POST"], name="pause"),
            Route("/queues/{name:path}/resume", actions.resume, methods=["POST"], name="resume"),
            Route("/events", pages.events, name="events"),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            *_metrics_routes(store, metrics),
            *routes,
        ],
        lifespan=lifespan,
    )
    hook = auth if auth is not None else basic_auth_from_env()
    app.add_middleware(AuthMiddleware, hook=hook)
    app.state.jobrunner = store.runner
    return app


def _metrics_routes(store: Store, wanted: bool | None) -> list[Mount]:
    """``/metrics`` when asked for, or by default when prometheus-client is installed."""
    if wanted is False:
        return []
    try:
        from ..contrib.prometheus import dashboard_metrics
    except ImportError:
        if wanted:
            raise
        return []
    url = store.runner.engine.url.render_as_string(hide_password=False)
    return [Mount("/metrics", app=dashboard_metrics(url), name="metrics")]


def _store(url_or_runner: str | JobRunner | AsyncJobRunner | None) -> Store:
    if isinstance(url_or_runner, JobRunner | AsyncJobRunner):
        return Store(url_or_runner, owned=False)
    return Store(JobRunner(url_or_runner), owned=True)
