"""JobRunner (sync) and AsyncJobRunner (async): the same verbs over one state machine.

Both drive :class:`~jobrunner._attempt.AttemptState` through the phases of
:mod:`jobrunner._phases`, with tenacity deciding when to try again. Only the I/O edge
differs: ``JobRunner`` never creates an event loop; ``AsyncJobRunner`` runs async phases
on the loop and sync ones in worker threads.
"""

from ._async_runner import AsyncJobRunner
from ._sync_runner import JobRunner

__all__ = ["AsyncJobRunner", "JobRunner"]
