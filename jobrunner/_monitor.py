"""Which execution and phase is running right now (contextvars), and loop health."""

from __future__ import annotations

import contextvars
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._attempt import AttemptState


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseInfo:
    """The execution, job and phase a piece of code runs on behalf of."""

    execution_id: str
    job: str
    phase: str
    state: AttemptState


#: Set while a phase runs; read by the loop monitor and by log records.
current_phase: contextvars.ContextVar[PhaseInfo | None] = contextvars.ContextVar(
    "jobrunner_current_phase", default=None
)
