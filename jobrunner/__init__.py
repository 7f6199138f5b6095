"""jobrunner: phased background jobs, each phase in its own database session.

Subclass :class:`PhasedJob`, run it with :class:`JobRunner` (sync) or
:class:`AsyncJobRunner` (async), and every execution is recorded in your database.
"""

from ._engine import DEFAULT_URL
from ._exceptions import (
    ConfigurationError,
    DatabaseUnavailable,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionNotFound,
    IdempotencyConflict,
    InvalidArgs,
    InvalidTransition,
    JobDefinitionError,
    JobNotFound,
    JobRunnerError,
    JobTimedOut,
    LeaseLost,
    LoopBlocked,
    PhaseSessionClosed,
    ResultNotSerializable,
    SchemaMissing,
)
from ._hooks import AttemptObserver, AttemptView, Instrument
from ._job import PhasedJob
from ._migrate import migrate
from ._monitor import LoopMonitor, monitor_blocking
from ._records import Attempt, AuditEntry, Execution, JobStats, QueueState
from ._registry import Registry, default_registry
from ._retry import TRANSIENT_ERRORS, RetryPolicy
from ._runner import AsyncJobRunner, JobRunner
from ._schema import ExecutionStatus, metadata

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "TRANSIENT_ERRORS",
    "AsyncJobRunner",
    "Attempt",
    "AttemptObserver",
    "AttemptView",
    "AuditEntry",
    "ConfigurationError",
    "DatabaseUnavailable",
    "Execution",
    "ExecutionCancelled",
    "ExecutionFailed",
    "ExecutionNotFound",
    "ExecutionStatus",
    "IdempotencyConflict",
    "Instrument",
    "InvalidArgs",
    "InvalidTransition",
    "JobDefinitionError",
    "JobNotFound",
    "JobRunner",
    "JobRunnerError",
    "JobStats",
    "JobTimedOut",
    "LeaseLost",
    "LoopBlocked",
    "LoopMonitor",
    "PhaseSessionClosed",
    "PhasedJob",
    "QueueState",
    "Registry",
    "ResultNotSerializable",
    "RetryPolicy",
    "SchemaMissing",
    "__version__",
    "default_registry",
    "metadata",
    "migrate",
    "monitor_blocking",
]
