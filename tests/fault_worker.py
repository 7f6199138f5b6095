"""A worker process for the fault tests: `python -m tests.fault_worker MODE URL [ID]`.

Modes: `run ID` runs one execution (heartbeat every 0.25 s) and prints its final
status; `drain` calls run_due until nothing is pending or running; `submit-keys SEED`
submits faults.keyed with 250 idempotency keys in a shuffled order.
"""

from __future__ import annotations

import logging
import random
import sys
import time

from jobrunner import JobRunner

from . import fault_jobs


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    mode, url = argv[0], argv[1]
    runner = JobRunner(url, heartbeat_interval=0.25)
    try:
        if mode == "run":
            execution = runner.run_execution(argv[2])
            print(f"final {execution.status} attempt {execution.attempt}", flush=True)
        elif mode == "drain":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if runner.run_due(limit=1):
                    # Other work between executions, as real workers have: it lets the
                    # other processes' claims in, so the work is really shared.
                    time.sleep(random.uniform(0, 0.02))
                else:
                    left = runner.list(status=["pending", "running", "retrying"], limit=1)
                    if not left:
                        break
                    time.sleep(0.01)  # another worker holds the only slot: ask again
        elif mode == "submit-keys":
            keys = [f"key-{i}" for i in range(250)]
            random.Random(int(argv[2])).shuffle(keys)
            for key in keys:
                runner.submit(fault_jobs.Keyed, idempotency_key=key)
        return 0
    finally:
        runner.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
