"""PhasedJob: the base class applications subclass, and what the runner learns from it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
import math
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, ParamSpec, TypeVar

import pydantic
import pydantic_core

from ._exceptions import InvalidArgs, JobDefinitionError, ResultNotSerializable
from ._retry import NO_RETRY, RetryPolicy

if TYPE_CHECKING:
    from ._session import SessionScope

P = ParamSpec("P")
T = TypeVar("T")

PHASES = ("load", "execute", "record")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """What the runner needs to know about a job class, computed once at definition."""

    name: str
    handler: str
    async_phases: frozenset[str]
    overridden: frozenset[str]

    def is_async(self, phase: str) -> bool:
        """Whether ``phase`` is an ``async def`` on this job."""
        return phase in self.async_phases

    def runs(self, phase: str) -> bool:
        """Whether the job overrides ``phase`` (default load/record do no I/O)."""
        return phase in self.overridden


@dataclasses.dataclass(kw_only=True)
class JobContext:
    """What a running job instance can reach: ids, its session scope, cancellation."""

    execution_id: str
    attempt: int
    session_scope: Callable[[], SessionScope]
    cancel_event: threading.Event
    #: The runner's own thread pool (``to_thread`` uses it, not the loop's default).
    pool: concurrent.futures.Executor | None = None


def _check_positive(cls: type, attr: str) -> None:
    value = getattr(cls, attr)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise JobDefinitionError(
            f"{cls.__qualname__}.{attr} must be a positive number of seconds or None, got {value!r}"
        )


class PhasedJob:
    """Subclass this and define ``execute`` (and optionally ``load`` and ``record``).

    A run has three phases, each ``def`` or ``async def``:

    * ``load(session, args)`` reads inputs in its own transaction, committed before
      execute starts. Return plain data; the session is closed afterwards.
    * ``execute(loaded)`` does the slow work with no session held. Use
      ``self.session()`` for short database work of its own.
    * ``record(session, result)`` writes outputs in a fresh transaction, committed
      together with the ``succeeded`` status.

    Class attributes: ``name`` (default: the handler path ``"module:Class"``),
    ``Args`` (a pydantic model validating the arguments), ``Result`` (optional pydantic
    model the checkpointed result is validated into before ``record``), ``retry``
    (:class:`RetryPolicy`), ``timeout`` (seconds for execute), ``load_timeout``,
    ``record_timeout``, ``max_concurrency`` (at most this many executions of the job run
    at once, per :meth:`concurrency_key`), ``queue`` (workers can be limited to some
    queues; default ``"default"``) and ``priority`` (higher runs first; default 0). Pass
    ``abstract=True`` in the class statement for shared bases.

    Module-level job classes register themselves in the default registry when defined
    (``register=False`` in the class statement opts out); importing the module that
    defines them is enough for workers and the CLI to find them by name.
    """

    name: ClassVar[str]
    handler: ClassVar[str]
    Args: ClassVar[type[pydantic.BaseModel] | None] = None
    Result: ClassVar[type[pydantic.BaseModel] | None] = None
    retry: ClassVar[RetryPolicy] = NO_RETRY
    timeout: ClassVar[float | None] = None
    load_timeout: ClassVar[float | None] = None
    record_timeout: ClassVar[float | None] = None
    max_concurrency: ClassVar[int | None] = None
    queue: ClassVar[str] = "default"
    priority: ClassVar[int] = 0
    spec: ClassVar[JobSpec]

    _context: JobContext | None = None

    def __init_subclass__(
        cls, *, abstract: bool = False, register: bool = True, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        handler = f"{cls.__module__}:{cls.__qualname__}"
        if "execute" not in _overridden(cls):
            raise JobDefinitionError(
                f"{cls.__qualname__} does not define execute(self, loaded); every PhasedJob "
                "needs one (pass abstract=True in the class statement for a shared base class)"
            )
        cls.handler = handler
        if "name" not in cls.__dict__:
            cls.name = handler
        if not isinstance(cls.name, str) or not cls.name.strip():
            raise JobDefinitionError(f"{cls.__qualname__}.name must be a non-empty string")
        if not isinstance(cls.retry, RetryPolicy):
            raise JobDefinitionError(
                f"{cls.__qualname__}.retry must be a RetryPolicy, got {cls.retry!r}"
            )
        for attr in ("timeout", "load_timeout", "record_timeout"):
            _check_positive(cls, attr)
        limit = cls.max_concurrency
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise JobDefinitionError(
                f"{cls.__qualname__}.max_concurrency must be a positive int or None, got {limit!r}"
            )
        if not isinstance(cls.queue, str) or not cls.queue.strip() or len(cls.queue) > 100:
            raise JobDefinitionError(
                f"{cls.__qualname__}.queue must be a non-empty string of at most 100 "
                f"characters, got {cls.queue!r}"
            )
        if isinstance(cls.priority, bool) or not isinstance(cls.priority, int):
            raise JobDefinitionError(
                f"{cls.__qualname__}.priority must be an int (higher runs first), "
                f"got {cls.priority!r}"
            )
        for attr in ("Args", "Result"):
            model = getattr(cls, attr)
            if model is not None and not (
                isinstance(model, type) and issubclass(model, pydantic.BaseModel)
            ):
                raise JobDefinitionError(
                    f"{cls.__qualname__}.{attr} must be a pydantic BaseModel subclass"
                )
        cls.spec = JobSpec(
            name=cls.name,
            handler=handler,
            async_phases=frozenset(p for p in PHASES if _is_async(getattr(cls, p))),
            overridden=frozenset(_overridden(cls)),
        )
        if register and "<locals>" not in cls.__qualname__:
            from ._registry import default_registry

            default_registry.register(cls)

    # -- the three phases -------------------------------------------------------------

    def load(self, session: Any, args: Any) -> Any:
        """Read what execute needs; the default returns ``args`` unchanged."""
        return args

    def execute(self, loaded: Any) -> Any:
        """Do the work. Must be overridden."""
        raise NotImplementedError

    def record(self, session: Any, result: Any) -> None:
        """Write the outputs; the default writes nothing."""

    # -- helpers available inside phases ----------------------------------------------

    @property
    def execution_id(self) -> str:
        """The id of the execution this instance is running."""
        return self._require_context().execution_id

    @property
    def attempt(self) -> int:
        """The attempt number (1 for the first try)."""
        return self._require_context().attempt

    def session(self) -> SessionScope:
        """A fresh short-lived session: ``with`` in sync code, ``async with`` in async.

        It commits on a clean exit and rolls back on error; it shares nothing with the
        phase sessions, so nested helpers never collide on one connection.
        """
        return self._require_context().session_scope()

    def cancelled(self) -> bool:
        """True once this execution was cancelled; long sync code should check it."""
        return self._require_context().cancel_event.is_set()

    async def to_thread(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking ``fn`` in a worker thread so the event loop keeps serving.

        The thread comes from the runner's own bounded pool (context variables copied),
        so stuck calls never crowd the loop's default executor; outside a runner it is
        ``asyncio.to_thread``.
        """
        pool = self._context.pool if self._context is not None else None
        if pool is None:
            return await asyncio.to_thread(fn, *args, **kwargs)
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def _require_context(self) -> JobContext:
        if self._context is None:
            raise JobDefinitionError(
                f"{type(self).__qualname__} is not running under a runner; "
                "session(), execution_id and cancelled() exist only inside phases"
            )
        return self._context

    @classmethod
    def concurrency_key(cls, args: Any) -> str | None:
        """Split ``max_concurrency`` by a key from the args (e.g. one per customer).

        The default, None, makes every execution of the job share one limit.
        """
        return None

    # -- argument and result handling (used by the runners) ----------------------------

    @classmethod
    def concurrency_key_for(cls, args: Any) -> str | None:
        """The stored concurrency key of an execution with ``args`` (None: unlimited)."""
        if cls.max_concurrency is None:
            return None
        sub = cls.concurrency_key(args)
        return cls.name if sub is None else f"{cls.name}:{sub}"

    @classmethod
    def validate_args(cls, args: Any) -> tuple[Any, dict[str, Any]]:
        """Validate ``args``; return (value for ``load``, JSON-ready dict to store)."""
        if cls.Args is None:
            data = {} if args is None else args
            if isinstance(data, pydantic.BaseModel):
                data = data.model_dump(mode="json")
            if not isinstance(data, Mapping):
                raise InvalidArgs(
                    f"args for job {cls.name!r} must be a mapping (the job declares no Args "
                    f"model), got {type(args).__name__}"
                )
            stored = _jsonable(dict(data), f"args for job {cls.name!r}", InvalidArgs)
            return stored, stored
        try:
            # An instance is validated as it is (not dumped and re-read, which breaks on
            # field aliases); a mapping is read the way a worker will read it back.
            model = cls.Args.model_validate({} if args is None else args)
        except pydantic.ValidationError as exc:
            raise InvalidArgs(f"invalid args for job {cls.name!r}: {_summary(exc)}") from exc
        # Stored by alias, so the worker's model_validate() reads it back exactly: args
        # stored by field name fail an aliased model's validation after the fact.
        stored = model.model_dump(mode="json", by_alias=True)
        _check_storable(stored, None, f"args for job {cls.name!r}", InvalidArgs)
        return model, stored

    @classmethod
    def dump_result(cls, result: Any) -> Any:
        """The JSON form of ``execute``'s result, as it is checkpointed.

        With a ``Result`` model the result goes through it (by alias), so ``record`` gets
        back exactly what ``execute`` returned; sets are fine there.
        """
        what = f"the result of {cls.name!r}.execute"
        if cls.Result is not None and isinstance(result, cls.Result):
            data = result.model_dump(mode="json", by_alias=True)
            _check_storable(data, None, what, ResultNotSerializable)
            return data
        return _jsonable(result, what, ResultNotSerializable)

    @classmethod
    def restore_result(cls, stored: Any) -> Any:
        """What ``record`` receives: the checkpoint, validated into ``Result`` if declared."""
        if cls.Result is None:
            return stored
        return cls.Result.model_validate(stored)


def _jsonable(value: Any, what: str, error: type[Exception]) -> Any:
    try:
        data = pydantic_core.to_jsonable_python(value)
    except pydantic_core.PydanticSerializationError as exc:
        raise error(
            f"{what} is not JSON-serialisable ({exc}); return plain data (dict, list, str, "
            "numbers), a dataclass or a pydantic model"
        ) from exc
    _check_storable(data, value, what, error)
    return data


def _check_storable(data: Any, original: Any, what: str, error: type[Exception]) -> None:
    """Refuse what one backend would store and the other reject, or what would not come
    back as it went in: the same error on SQLite and PostgreSQL, before any side effect."""
    problem = _unstorable(data, "") or _set_inside(
        original, "", "Result" if error is ResultNotSerializable else "Args"
    )
    if problem is not None:
        raise error(f"{what} cannot be stored: {problem}")


#: JSONB turns floats written with an exponent (Python writes 1e16 and above that way)
#: into plain integers, which read back as other numbers: refused on every backend.
_FLOAT_DIGITS_LIMIT = 1e16


def _unstorable(value: Any, where: str) -> str | None:
    """NaN, ±Infinity and NUL characters: JSON (and PostgreSQL's JSONB) has no place for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} at {where or 'the top'} is not a JSON number; use None or a string"
    if isinstance(value, float) and abs(value) >= _FLOAT_DIGITS_LIMIT:
        return (
            f"the float {value!r} at {where or 'the top'} would come back from PostgreSQL "
            "(JSONB) as a different integer; pass it as an int or a string"
        )
    if isinstance(value, str) and "\x00" in value:
        return f"a NUL character (\\x00) in the string at {where or 'the top'}"
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in str(key):
                return f"a NUL character (\\x00) in the key {key!r}"
            found = _unstorable(item, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _unstorable(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def _set_inside(value: Any, where: str, model: str) -> str | None:
    """A set comes back from JSON as a list: refused rather than changed on the way."""
    if isinstance(value, set | frozenset):
        return (
            f"a set at {where or 'the top'} would come back as a list; use a (sorted) "
            f"list, or declare {'an' if model == 'Args' else 'a'} {model} model with a "
            "set field"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            found = _set_inside(item, f"{where}.{key}" if where else str(key), model)
            if found is not None:
                return found
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _set_inside(item, f"{where}[{index}]", model)
            if found is not None:
                return found
    return None


def _summary(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "args"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(inspect.unwrap(fn))


def _overridden(cls: type) -> set[str]:
    return {p for p in PHASES if getattr(cls, p) is not getattr(PhasedJob, p)}
