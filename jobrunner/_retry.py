"""RetryPolicy: retry settings as frozen data; the tenacity controller is built per run."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable

import sqlalchemy.exc
import tenacity

from ._exceptions import (
    ConfigurationError,
    ExecutionCancelled,
    InvalidArgs,
    LeaseLost,
    ResultNotSerializable,
)

ExceptionSpec = type[BaseException] | str

#: Errors worth retrying when a policy names none: the network and the database blinked.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)

# Deterministic outcomes: retrying them would only repeat the same result.
_NEVER_RETRIED: tuple[type[BaseException], ...] = (
    ResultNotSerializable,
    ExecutionCancelled,
    LeaseLost,
    InvalidArgs,
)


def _resolve(spec: ExceptionSpec, field: str) -> type[BaseException]:
    if isinstance(spec, type) and issubclass(spec, BaseException):
        return spec
    if not isinstance(spec, str) or "." not in spec:
        raise ConfigurationError(
            f"RetryPolicy.{field}: {spec!r} is not an exception class or a dotted path "
            "like 'httpx.ConnectError'"
        )
    module_name, _, attr = spec.replace(":", ".").rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"RetryPolicy.{field}: cannot import exception {spec!r} ({exc}); "
            "check the module path and that the package is installed"
        ) from exc
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ConfigurationError(f"RetryPolicy.{field}: {spec!r} is not an exception class")
    return found


# tenacity 9.1 renamed wait_exponential_jitter's `initial` to `multiplier`.
_INITIAL = (
    "multiplier"
    if "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters
    else "initial"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How an execution is retried. Default: one attempt, no retry.

    Waits grow as ``wait_initial * multiplier ** (attempt - 1)`` plus up to ``jitter``
    seconds, capped at ``wait_max``. Exceptions are retried when they match ``retry_on``
    (by default only transient errors: connection, timeout, database disconnects), do not
    match ``give_up_on``, and ``should_retry(exc)`` (if given) returns true. Exceptions may
    be classes or dotted paths, resolved when the policy is created.
    """

    max_attempts: int = 1
    wait_initial: float = 1.0
    wait_max: float = 300.0
    multiplier: float = 2.0
    jitter: float = 1.0
    retry_on: tuple[ExceptionSpec, ...] = TRANSIENT_ERRORS
    give_up_on: tuple[ExceptionSpec, ...] = ()
    should_retry: Callable[[BaseException], bool] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigurationError(
                f"RetryPolicy.max_attempts must be an int, got {self.max_attempts!r}"
            )
        if self.max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy.max_attempts must be at least 1 (1 = no retry), "
                f"got {self.max_attempts}"
            )
        for field in ("wait_initial", "wait_max", "jitter"):
            if getattr(self, field) < 0:
                raise ConfigurationError(f"RetryPolicy.{field} must be >= 0")
        if self.multiplier < 1:
            raise ConfigurationError("RetryPolicy.multiplier must be >= 1")
        resolve = _resolve
        object.__setattr__(self, "retry_on", tuple(resolve(e, "retry_on") for e in self.retry_on))
        object.__setattr__(
            self, "give_up_on", tuple(resolve(e, "give_up_on") for e in self.give_up_on)
        )

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether this policy retries ``exc`` (attempts left aside)."""
        if isinstance(exc, _NEVER_RETRIED) or not isinstance(exc, Exception):
            return False
        if isinstance(exc, self.give_up_on):  # type: ignore[arg-type]
            return False
        if not isinstance(exc, self.retry_on):  # type: ignore[arg-type]
            return False
        return self.should_retry is None or bool(self.should_retry(exc))

    def describe(self) -> str:
        """One line for people: ``'5 attempts, 1s..300s backoff'`` or ``'no retry'``."""
        if self.max_attempts == 1:
            return "no retry"
        return f"{self.max_attempts} attempts, {self.wait_initial:g}s..{self.wait_max:g}s backoff"

    @functools.cached_property
    def _wait(self) -> tenacity.wait.wait_base:
        return tenacity.wait_exponential_jitter(
            max=self.wait_max,
            exp_base=self.multiplier,
            jitter=self.jitter,
            **{_INITIAL: self.wait_initial},
        )

    def wait_after(self, attempt: int) -> float:
        """Seconds to wait after attempt number ``attempt`` failed (tenacity's backoff).

        Counted from the execution's attempt number, not the current run's, so a worker
        picking an execution up after a crash keeps growing the wait.
        """
        state = tenacity.RetryCallState(retry_object=_CONTROLLER, fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        return float(self._wait(state))


#: Only to build RetryCallState values for wait strategies; never runs anything.
_CONTROLLER = tenacity.Retrying()

NO_RETRY = RetryPolicy()
