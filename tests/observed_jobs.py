"""Jobs for the observability tests; module level so `jobrunner worker --app` imports them."""

from __future__ import annotations

import logging
from typing import Any

from jobrunner import PhasedJob, RetryPolicy

log = logging.getLogger("tests.observed")


class Ok(PhasedJob):
    """Succeeds, logging one line of its own from execute."""

    name = "observed.ok"

    def execute(self, loaded: Any) -> str:
        log.info("observed ok says hello")
        return "ok"


class Bad(PhasedJob):
    """Fails in execute, once and for all."""

    name = "observed.bad"
    retry = RetryPolicy(max_attempts=1)

    def execute(self, loaded: Any) -> None:
        raise ValueError("observed failure")


class Flaky(PhasedJob):
    """Fails its first attempt (retryable), succeeds the second."""

    name = "observed.flaky"
    retry = RetryPolicy(max_attempts=2, wait_initial=0.01, jitter=0.0, retry_on=(ConnectionError,))

    def execute(self, loaded: Any) -> int:
        if self.attempt == 1:
            raise ConnectionError("first attempt fails")
        return self.attempt
