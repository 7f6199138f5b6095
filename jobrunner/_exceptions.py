"""Every error jobrunner raises derives from :class:`JobRunnerError`.

The tree:

```text
    JobRunnerError
    ├── JobNotFound               (LookupError)   unknown job name or handler path
    ├── ExecutionNotFound         (LookupError)   unknown execution id
    ├── JobDefinitionError        (TypeError)     a PhasedJob subclass is malformed
    ├── InvalidArgs               (ValueError)    args fail the job's Args model
    ├── IdempotencyConflict       (ValueError)    a key reused for other args
    ├── ConfigurationError        (ValueError)    bad URL, bad option, bad retry policy
    ├── DatabaseUnavailable       (ConnectionError) the store cannot be reached
    ├── SchemaMissing             (RuntimeError)  jobrunner tables are not there yet
    ├── PhaseSessionClosed        (RuntimeError)  a phase session used after its phase
    ├── ResultNotSerializable     (TypeError)     execute returned non-JSON data
    ├── InvalidTransition         (RuntimeError)  e.g. cancel a finished execution
    ├── LeaseLost                 (RuntimeError)  another worker owns the execution now
    ├── JobTimedOut               (TimeoutError)  a phase ran past its timeout
    ├── ExecutionCancelled        (RuntimeError)  the execution was cancelled while running
    ├── LoopBlocked               (RuntimeError)  strict loop mode caught a blocking phase
    └── ExecutionFailed           (RuntimeError)  raised by Execution.raise_for_status()
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._records import Execution


class JobRunnerError(Exception):
    """Root of every error raised by jobrunner."""


class JobNotFound(JobRunnerError, LookupError):
    """No registered job has this name or handler path."""


class ExecutionNotFound(JobRunnerError, LookupError):
    """No execution has this id."""


class JobDefinitionError(JobRunnerError, TypeError):
    """A PhasedJob subclass is malformed (missing execute, bad timeout, ...)."""


class InvalidArgs(JobRunnerError, ValueError):
    """Arguments do not validate against the job's ``Args`` model."""


class ConfigurationError(JobRunnerError, ValueError):
    """A setting is malformed: database URL, runner option, retry policy."""


class DatabaseUnavailable(JobRunnerError, ConnectionError):
    """The execution store cannot be reached."""


class SchemaMissing(JobRunnerError, RuntimeError):
    """The jobrunner tables do not exist in the database yet."""


class PhaseSessionClosed(JobRunnerError, RuntimeError):
    """A phase's session was used after that phase committed and closed."""


class ResultNotSerializable(JobRunnerError, TypeError):
    """``execute`` returned something that cannot be stored as JSON."""


class IdempotencyConflict(JobRunnerError, ValueError):
    """An idempotency key of a job was used before with other args.

    ``execution_id`` is the execution that holds the key.
    """

    def __init__(self, message: str, execution_id: object) -> None:
        super().__init__(message)
        self.execution_id = execution_id


class InvalidTransition(JobRunnerError, RuntimeError):
    """The requested status change is not allowed from the current status."""


class LeaseLost(JobRunnerError, RuntimeError):
    """This attempt no longer owns the execution; its writes were refused."""


class JobTimedOut(JobRunnerError, TimeoutError):
    """A phase ran longer than its timeout."""


class ExecutionCancelled(JobRunnerError, RuntimeError):
    """The execution was cancelled while it ran."""


class LoopBlocked(JobRunnerError, RuntimeError):
    """Strict loop mode: a phase held the event loop longer than allowed."""


class ExecutionFailed(JobRunnerError, RuntimeError):
    """An execution ended without succeeding (see :meth:`Execution.raise_for_status`)."""

    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        where = f" in {execution.phase}" if execution.phase else ""
        detail = (
            f": {execution.error_type}: {execution.error_message}" if execution.error_type else ""
        )
        super().__init__(
            f"execution {execution.id} of {execution.job!r} ended {execution.status}{where}{detail}"
        )
