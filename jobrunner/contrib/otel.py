"""OpenTelemetry traces for every execution, attempt and phase (``jobrunner[otel]``).

Spans follow the OpenTelemetry messaging semantic conventions, with the execution as
the message and its queue as the destination:

* each submit makes a PRODUCER span ``create <queue>`` and stores its W3C trace context
  (``traceparent``, ``tracestate``) on the execution row (``trace_context``);
* each attempt makes a CONSUMER span ``process <queue>``, a child of that stored context
  and linked to it (so it joins the submitter's trace whichever process runs it: a
  ``jobrunner worker``, a Celery worker, an APScheduler fire); an inline ``run()`` is a
  child of the caller's current span;
* ``load``, ``execute`` and ``record`` are INTERNAL children of the attempt's span, each
  the current span while the phase's own code runs, so spans your code makes (httpx,
  SQLAlchemy instrumentations) nest under the phase;
* retries and lost leases are span events; a failed attempt's span has status ERROR and
  ``error.type``.

Attributes: ``messaging.system = "jobrunner"``, ``messaging.operation.type`` and
``messaging.operation.name`` (``create`` / ``process``), ``messaging.destination.name``
(the queue), ``messaging.message.id`` (the execution id), ``messaging.client.id`` (the
worker), ``jobrunner.job``, ``jobrunner.attempt``, ``jobrunner.phase``,
``jobrunner.outcome``.

Runners use it by themselves once the application has set a tracer provider
(``trace.set_tracer_provider(...)``) before creating them; or pass
``instruments=[OpenTelemetry(tracer_provider)]`` to a runner, or :func:`instrument`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._attempt import describe
from .._exceptions import ConfigurationError
from .._hooks import AttemptObserver, AttemptView, Instrument, install

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ConfigurationError(
        "jobrunner.contrib.otel needs OpenTelemetry: pip install 'jobrunner[otel]'"
    ) from exc

if TYPE_CHECKING:
    from .._attempt import ErrorInfo
    from .._records import Execution

__all__ = ["SYSTEM", "OpenTelemetry", "instrument", "provider_configured"]

#: ``messaging.system`` of every span.
SYSTEM = "jobrunner"

_W3C = TraceContextTextMapPropagator()


def provider_configured() -> bool:
    """Whether the application set a global tracer provider (the API's default is a proxy
    that records nothing until one is set)."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def instrument(tracer_provider: Any = None) -> OpenTelemetry:
    """Trace every runner created after this call in this process; returns the instrument."""
    instance = OpenTelemetry(tracer_provider)
    install(instance)
    return instance


class OpenTelemetry(Instrument):
    """The OpenTelemetry instrument: spans per submit, attempt and phase.

    ``tracer_provider``: the provider to make spans with (default: the global one, looked
    up on each use, so setting it later still works). ``phase_spans=False`` leaves out
    the ``load``/``execute``/``record`` spans (the attempt's span is then current in the
    phases): two spans per execution instead of five. A phase the job does not define
    (a job with only ``execute``) gets no span of its own either: no code of the job
    runs there, and the attempt's span covers jobrunner's write.
    """

    #: Marks a tracing instrument (runners add no second one by themselves).
    traces = True

    def __init__(self, tracer_provider: Any = None, *, phase_spans: bool = True) -> None:
        from .. import __version__

        self.tracer = trace.get_tracer("jobrunner", __version__, tracer_provider=tracer_provider)
        self.phase_spans = phase_spans

    def submitted(self, row: dict[str, Any], *, inline: bool) -> None:
        """A PRODUCER span for the submit; its context goes on the row."""
        carrier: dict[str, str] = {}
        if inline:  # run(): no message in between; later attempts join the caller's trace
            _W3C.inject(carrier)
        else:
            queue = row["queue"]
            attributes = _attributes("create", queue, str(row["id"]), row["job"])
            span = self.tracer.start_span(
                f"create {queue}", kind=SpanKind.PRODUCER, attributes=attributes
            )
            _W3C.inject(carrier, context=trace.set_span_in_context(span))
            span.end()
        if carrier:
            row["trace_context"] = carrier

    def attempt_started(self, attempt: AttemptView) -> AttemptObserver | None:
        """A CONSUMER span for the attempt, current until it ends."""
        parent = None
        links: Sequence[Link] = ()
        if attempt.trace_context:
            parent = _W3C.extract(attempt.trace_context)
            created = trace.get_current_span(parent).get_span_context()
            if created.is_valid:
                links = (Link(created),)
            else:
                parent = None
        attributes = _attributes("process", attempt.queue, attempt.execution_id, attempt.job)
        attributes["messaging.client.id"] = attempt.worker
        attributes["jobrunner.attempt"] = attempt.attempt
        span = self.tracer.start_span(
            f"process {attempt.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        )
        if not span.is_recording():
            # Unsampled: its phases would not be sampled either, and nothing set on it is
            # kept. It is only made current, so that spans of the job's own code see an
            # unsampled parent (a ParentBased sampler then drops them too).
            return _Unsampled(span)
        return _Attempt(self.tracer, span, attempt, phase_spans=self.phase_spans)


def _attributes(operation: str, queue: str, execution_id: str, job: str) -> dict[str, Any]:
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": queue,
        "messaging.message.id": execution_id,
        "jobrunner.job": job,
    }


#: The attribute of each phase's span (the attempt's span, their parent, carries the
#: rest: each attribute costs).
_PHASE_ATTRIBUTES = {phase: {"jobrunner.phase": phase} for phase in ("load", "execute", "record")}


class _Unsampled(AttemptObserver):
    """An attempt the sampler left out: its span is current while it runs, nothing more."""

    __slots__ = ("_token",)

    def __init__(self, span: Any) -> None:
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def attempt_ended(
        self, outcome: str, execution: Execution | None, error: ErrorInfo | None
    ) -> None:
        otel_context.detach(self._token)


class _Attempt(AttemptObserver):
    """One attempt's span, and its phases' spans; each current while it is open."""

    __slots__ = (
        "_last_phase",
        "_own",
        "_phase",
        "_phase_token",
        "_span",
        "_token",
        "_tracer",
    )

    def __init__(self, tracer: Any, span: Any, attempt: AttemptView, *, phase_spans: bool) -> None:
        self._tracer = tracer
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))
        # The phases that get a span: those the job defines (its own code runs there).
        self._own = attempt.own_phases if phase_spans else frozenset()
        self._phase: Any = None
        self._phase_token: Any = None
        self._last_phase: str | None = None

    def phase_started(self, phase: str) -> None:
        self._last_phase = phase
        if phase not in self._own:
            # No span where no code of the job runs (only jobrunner's write, timed by
            # the attempt's span); the attempt's span stays current for the phase.
            return
        span = self._phase = self._tracer.start_span(
            phase,
            kind=SpanKind.INTERNAL,
            attributes=_PHASE_ATTRIBUTES[phase],
        )
        self._phase_token = otel_context.attach(trace.set_span_in_context(span))

    def phase_ended(self, phase: str, seconds: float, error: BaseException | None) -> None:
        span = self._phase
        if span is None:
            return
        self._phase = None
        otel_context.detach(self._phase_token)
        self._phase_token = None
        if error is not None:
            span.record_exception(error)
            span.set_attribute("error.type", describe(error)[0])
            span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
        span.end()

    def retry_scheduled(self, wait: float, due_at: datetime | None) -> None:
        attributes: dict[str, Any] = {"jobrunner.retry.wait_s": wait}
        if due_at is not None:
            attributes["jobrunner.retry.due_at"] = due_at.isoformat()
        self._span.add_event("retry_scheduled", attributes)

    def lease_lost(self) -> None:
        self._span.add_event("lease_lost", {"jobrunner.phase": self._last_phase or "none"})

    def attempt_ended(
        self, outcome: str, execution: Execution | None, error: ErrorInfo | None
    ) -> None:
        span = self._span
        # One call for all of them: the span takes its lock once.
        attributes: dict[str, Any] = {"jobrunner.outcome": outcome}
        if self._last_phase is not None:  # the phase it ended in
            attributes["jobrunner.phase"] = self._last_phase
        if outcome != "succeeded":
            attributes["error.type"] = error.type if error is not None else f"jobrunner.{outcome}"
            message = f"{error.type}: {error.message}" if error is not None else outcome
            span.set_status(Status(StatusCode.ERROR, message))
        span.set_attributes(attributes)
        otel_context.detach(self._token)
        span.end()
