"""Prometheus metrics for executions, phases, queues and the event loop (``jobrunner[prometheus]``).

From the runners (an instrument, :class:`Metrics`), per process:

* ``jobrunner_executions_total{job,queue,outcome}``: attempts by how they ended
  (``succeeded``, ``failed``, ``timed_out``, ``cancelled``, ``retried``,
  ``interrupted``, ``lease_lost``, ``abandoned``);
* ``jobrunner_execution_duration_seconds{job,queue}``: each attempt, claim to end;
* ``jobrunner_phase_duration_seconds{job,phase}``: ``load``, ``execute``, ``record``;
* ``jobrunner_queue_wait_seconds{job,queue}``: from due to claimed;
* ``jobrunner_event_loop_lag_seconds``: the async runner's loop-monitor samples;
* ``jobrunner_leases_reaped_total``: executions the reaper recovered here.

From the database (a collector, :class:`DatabaseCollector`, cached ``cache_seconds``):

* ``jobrunner_executions{status,queue}``: executions not finished (``pending``,
  ``retrying``, ``running``);
* ``jobrunner_oldest_due_age_seconds{queue}``: how long the oldest due execution of each
  queue has waited.

No ids or keys are labels. ``jobrunner worker --metrics-port N`` serves all of them;
:func:`serve` and :func:`asgi_app` / :func:`wsgi_app` do the same in your process.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import NullPool

from .. import _queries as q
from .._engine import database_url, make_sync_engine
from .._exceptions import ConfigurationError
from .._hooks import OUTCOMES, AttemptObserver, AttemptView, Instrument, install

try:
    import prometheus_client
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ConfigurationError(
        "jobrunner.contrib.prometheus needs prometheus_client: pip install 'jobrunner[prometheus]'"
    ) from exc

if TYPE_CHECKING:
    from .._attempt import ErrorInfo
    from .._records import Execution

__all__ = [
    "DURATION_BUCKETS",
    "LAG_BUCKETS",
    "REGISTRY",
    "DatabaseCollector",
    "Metrics",
    "Server",
    "asgi_app",
    "instrument",
    "serve",
    "wsgi_app",
]

#: Seconds, up to four hours: jobs run from milliseconds to hours.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
)
#: Event-loop lag, seconds.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Families:
    """The metric families of one registry (registered once, shared by its instruments)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.executions = Counter(
            "jobrunner_executions",
            "Attempts of jobrunner executions, by how they ended.",
            ["job", "queue", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "jobrunner_execution_duration_seconds",
            "Duration of each attempt, from its claim to its end.",
            ["job", "queue"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.phase = Histogram(
            "jobrunner_phase_duration_seconds",
            "Duration of each phase (load, execute, record).",
            ["job", "phase"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "jobrunner_queue_wait_seconds",
            "Time from an execution coming due to its claim.",
            ["job", "queue"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.loop_lag = Histogram(
            "jobrunner_event_loop_lag_seconds",
            "Event-loop lag samples of AsyncJobRunner's loop monitor.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.reaped = Counter(
            "jobrunner_leases_reaped",
            "Executions whose lease had expired, recovered by this process's reaper.",
            registry=registry,
        )


# By the registry itself, weakly: keyed by id(), a new registry that took a collected
# one's id would get the old registry's families, and its metrics would never be seen.
_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _families_of(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        found = _families.get(registry)
        if found is None:
            found = _families[registry] = _Families(registry)
        return found


class Metrics(Instrument):
    """The Prometheus instrument: counts and times every attempt and phase.

    ``registry``: where the metrics live (default: prometheus_client's global
    ``REGISTRY``, which multiprocess mode also reads). Instruments on one registry share
    its metrics.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.families = _families_of(self.registry)
        self._series: dict[tuple[str, str], _Series] = {}

    def attempt_started(self, attempt: AttemptView) -> AttemptObserver | None:
        """Times the attempt; observes how long it waited to be claimed."""
        series = self._series.get((attempt.job, attempt.queue))
        if series is None:
            series = self._series[(attempt.job, attempt.queue)] = _Series(
                self.families, attempt.job, attempt.queue
            )
        if attempt.due_at is not None:
            waited = (attempt.claimed_at - attempt.due_at).total_seconds()
            series.queue_wait.observe(max(0.0, waited))
        return _Attempt(series)

    def reaped(self, executions: Sequence[Execution]) -> None:
        """Counts recovered executions."""
        self.families.reaped.inc(len(executions))

    def loop_lag(self, lag_ms: float) -> None:
        """Observes one loop-lag sample."""
        self.families.loop_lag.observe(lag_ms / 1000)


class _Series:
    """The labelled series of one (job, queue), looked up once (``labels()`` costs)."""

    def __init__(self, families: _Families, job: str, queue: str) -> None:
        self.queue_wait = families.queue_wait.labels(job, queue)
        self.duration = families.duration.labels(job, queue)
        self.phases = {p: families.phase.labels(job, p) for p in ("load", "execute", "record")}
        self.outcomes = {o: families.executions.labels(job, queue, o) for o in OUTCOMES}


class _Attempt(AttemptObserver):
    __slots__ = ("_series", "_started")

    def __init__(self, series: _Series) -> None:
        self._series = series
        self._started = time.perf_counter()

    def phase_ended(self, phase: str, seconds: float, error: BaseException | None) -> None:
        self._series.phases[phase].observe(seconds)

    def attempt_ended(
        self, outcome: str, execution: Execution | None, error: ErrorInfo | None
    ) -> None:
        self._series.outcomes[outcome].inc()
        self._series.duration.observe(time.perf_counter() - self._started)


def instrument(registry: CollectorRegistry | None = None) -> Metrics:
    """Measure every runner created after this call in this process; returns the instrument."""
    metrics = Metrics(registry)
    install(metrics)
    return metrics


class DatabaseCollector(Collector):
    """``jobrunner_executions{status,queue}`` and ``jobrunner_oldest_due_age_seconds{queue}``,
    read from the database at most once per ``cache_seconds``.

    Only unfinished executions are counted, through the claim's and the reaper's partial
    indexes, so a scrape costs in proportion to the backlog, never to the history
    (finished executions: ``rate(jobrunner_executions_total[5m])``). Register it in one
    process per database (e.g. the one serving ``/metrics``)::

        registry.register(DatabaseCollector("postgresql+psycopg://app@db/app"))

    A database that does not answer leaves the gauges out of that scrape (and the
    error is cached like a result, so a down database is not hammered).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        cache_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        **engine_options: Any,
    ) -> None:
        if "poolclass" not in engine_options:
            engine_options.setdefault("pool_size", 1)
            engine_options.setdefault("max_overflow", 0)
        self.engine = make_sync_engine(database_url(url), **engine_options)
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._cached: tuple[list[tuple[str, str, int]], list[tuple[str, float]]] | None = None
        #: How many times the database was read (tests, and your own curiosity).
        self.reads = 0
        # Queues seen so far: a drained queue reads 0 instead of vanishing.
        self._queues: set[str] = set()

    def describe(self) -> Iterable[Any]:
        # Nothing to check at registration: the families are built per scrape.
        return ()

    def collect(self) -> Iterator[Any]:
        cached = self._read()
        counts = GaugeMetricFamily(
            "jobrunner_executions",
            "Executions not finished yet, by status and queue (from the database).",
            labels=["status", "queue"],
        )
        oldest = GaugeMetricFamily(
            "jobrunner_oldest_due_age_seconds",
            "Seconds the oldest due execution of each queue has waited (from the database).",
            labels=["queue"],
        )
        if cached is not None:
            live, due = cached
            seen = {(status, queue) for queue, status, _ in live}
            with self._lock:
                self._queues.update(queue for queue, _, _ in live)
                queues = sorted(self._queues)
            for queue, status, count in live:
                counts.add_metric([status, queue], count)
            for queue in queues:  # zeros, so a drained status reads 0 instead of vanishing
                for status in q.LIVE_STATUSES:
                    if (status, queue) not in seen:
                        counts.add_metric([status, queue], 0)
            for queue, age in due:
                oldest.add_metric([queue], age)
        yield counts
        yield oldest

    def _read(self) -> tuple[list[tuple[str, str, int]], list[tuple[str, float]]] | None:
        with self._lock:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self.cache_seconds:
                return self._cached
            self._read_at = now
            try:
                with self.engine.connect() as conn:
                    self._cached = (q.live_counts(conn), q.oldest_due(conn))
                    conn.rollback()
            except Exception:
                self._cached = None
            self.reads += 1
            return self._cached

    def close(self) -> None:
        """Dispose of the collector's connection."""
        self.engine.dispose()


def _text(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus's text format (0.0.4).

    Always the text format, never OpenMetrics: there the ``jobrunner_executions`` gauge
    and the ``jobrunner_executions_total`` counter would be one family twice.
    """
    return bytes(prometheus_client.generate_latest(registry))


def wsgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI app serving ``registry`` (default: the global one) as ``/metrics`` text."""
    chosen = registry if registry is not None else REGISTRY

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = _text(chosen)
        start_response(
            "200 OK",
            [
                ("Content-Type", prometheus_client.CONTENT_TYPE_LATEST),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    return app


def asgi_app(registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI app serving ``registry`` as text: mount it at ``/metrics`` (Starlette
    ``Mount("/metrics", asgi_app())``, FastAPI ``app.mount("/metrics", asgi_app())``).

    A scrape may read the database (:class:`DatabaseCollector`): it runs in a thread,
    never on the event loop.
    """
    import asyncio

    chosen = registry if registry is not None else REGISTRY

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = await asyncio.to_thread(_text, chosen)
        headers = [
            (b"content-type", prometheus_client.CONTENT_TYPE_LATEST.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class _Everything:
    """A collector that yields what another registry holds (the process's own)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        return iter(self._registry.collect())


def dashboard_metrics(url: str, registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """The dashboard's ``/metrics``: ``registry`` (default: the process's) plus the
    database's gauges for ``url``, in a registry of the app's own (so two apps in one
    process do not register the same collector twice)."""
    served = CollectorRegistry(auto_describe=False)
    served.register(_Everything(registry if registry is not None else REGISTRY))
    # A connection per (cached) read, none held between scrapes: the app may be made
    # and dropped many times, and has no shutdown hook where it could close a pool.
    served.register(DatabaseCollector(url, poolclass=NullPool))
    return asgi_app(served)


class Server:
    """A ``/metrics`` HTTP server in a daemon thread (see :func:`serve`)."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        """The port it listens on (useful with ``port=0``)."""
        return int(self._httpd.server_port)

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None) -> Server:
    """Serve ``registry`` (default: the global one) over HTTP on ``addr:port`` from a
    daemon thread; returns the server (``.port``, ``.close()``)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """No access log on stderr."""

    httpd = make_server(addr, port, wsgi_app(registry), ThreadingWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="jobrunner-metrics", daemon=True)
    thread.start()
    return Server(httpd, thread)
