"""What the instruments cost per execution, in instructions (callgrind), beside none.

``python -m benchmarks.instructions [--n 100] [--jobs 2] [--only ROW]``

Instruction counts do not depend on what else the machine runs, so this measures on a
busy machine what throughput cannot. Each cell is one child process under
``valgrind --tool=callgrind --instr-atstart=no``: it sets up a runner on a SQLite file in
a temporary directory, runs 30 executions to warm up, then counts only the next ``n``
(the child switches callgrind on and off around them with a client request, from a
three-line C helper compiled into ``.bench/`` on first use: needs ``valgrind``, its
headers and ``cc``). Every thread of the process is counted, the span processor's too.

The runners are set up so that nothing in the count depends on time: no loop monitor,
no heartbeat, no slow-phase warning (under valgrind everything is slow). The tracer
provider is the SDK's with a ``BatchSpanProcessor`` into an exporter that drops spans,
as in ``benchmarks/observability.py``; sampling is ``ParentBased(TraceIdRatioBased)``.

Rows: ``AsyncJobRunner.run()`` and ``JobRunner.run()`` of a job with only ``execute``
(one phase span) and of one with ``load``, ``execute`` and ``record`` (three), and
``JobRunner`` submit then ``run_due()`` (a worker's path: a ``create`` span per submit).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._harness import ROOT

#: variant -> (tracing sample ratio or None for no tracing, phase spans); every variant
#: but ``off`` has Prometheus metrics too.
VARIANTS: dict[str, tuple[float | None, bool]] = {
    "off": (None, False),
    "metrics": (None, False),
    "traces+metrics": (1.0, True),
    "traces (phase_spans=False)+metrics": (1.0, False),
    "traces 10%+metrics": (0.1, True),
    "traces 0%+metrics": (0.0, True),
}
#: row -> (runner, job, mode)
ROWS: dict[str, tuple[str, str, str]] = {
    "AsyncJobRunner.run(), execute only": ("async", "noop", "run"),
    "AsyncJobRunner.run(), 3 phases": ("async", "phases", "run"),
    "JobRunner.run(), execute only": ("sync", "noop", "run"),
    "JobRunner.run(), 3 phases": ("sync", "phases", "run"),
    "JobRunner submit + run_due(), execute only": ("sync", "noop", "due"),
}
WARM_UP = 30
_HELPER = """#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("measured"); }
"""


def _helper() -> Path:
    """The client-request helper, compiled once into .bench/."""
    lib = ROOT / ".bench" / "libcgctl.so"
    if not lib.exists():
        lib.parent.mkdir(exist_ok=True)
        source = lib.with_suffix(".c")
        source.write_text(_HELPER)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return lib


# -- the child: one variant of one row, counted --------------------------------------------


def _instruments(variant: str) -> tuple[list[Any], Any]:
    ratio, phase_spans = VARIANTS[variant]
    if variant == "off":
        return [], None
    from ._jobs import instruments

    return instruments(ratio, phase_spans=phase_spans)


def _child(row: str, variant: str, n: int) -> None:
    import sqlalchemy as sa

    from jobrunner import AsyncJobRunner, JobRunner, Registry
    from jobrunner._schema import metadata

    from ._jobs import AsyncNoop, AsyncNoopPhases, SyncNoop, SyncNoopPhases


    counter = ctypes.CDLL(str(_helper()))
    runner_kind, job, mode = ROWS[row]
    instruments, provider = _instruments(variant)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'jobs.db'}"
        engine = sa.create_engine(url)
        metadata.create_all(engine)
        engine.dispose()
        quiet: dict[str, Any] = {"heartbeat_interval": 3600.0, "slow_phase_threshold": None}
        if runner_kind == "async":
            job_cls: Any = AsyncNoop if job == "noop" else AsyncNoopPhases

            async def go() -> None:
                runner = AsyncJobRunner(
                    url.replace("sqlite://", "sqlite+aiosqlite://"),
                    registry=Registry([job_cls]),
                    instruments=instruments,
                    monitor_loop=False,
                    loop_lag_threshold_ms=1e9,
                    **quiet,
                )
                for _ in range(WARM_UP):
                    await runner.run(job_cls)
                counter.cg_start()
                for _ in range(n):
                    await runner.run(job_cls)
                counter.cg_stop()
                await runner.aclose()

            asyncio.run(go())
        else:
            job_cls = SyncNoop if job == "noop" else SyncNoopPhases
            runner = JobRunner(url, registry=Registry([job_cls]), instruments=instruments, **quiet)
            if mode == "run":
                for _ in range(WARM_UP):
                    runner.run(job_cls)
                counter.cg_start()
                for _ in range(n):
                    runner.run(job_cls)
                counter.cg_stop()
            else:
                for _ in range(WARM_UP):
                    runner.submit(job_cls)
                runner.run_due(limit=WARM_UP, concurrency=1)
                counter.cg_start()
                for _ in range(n):
                    runner.submit(job_cls)
                done = 0
                while done < n:
                    done += len(runner.run_due(limit=n, concurrency=1))
                counter.cg_stop()
            runner.close()
    if provider is not None:
        provider.shutdown()


# -- the parent: every cell under callgrind, a table ---------------------------------------


def _count(row: str, variant: str, n: int, out: Path) -> float:
    """Instructions per execution of one cell."""
    prefix = out / f"{abs(hash((row, variant)))}"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={prefix}.%p",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--child",
        row,
        variant,
        str(n),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    for dump in out.glob(f"{prefix.name}.*"):
        text = dump.read_text()
        if "Client Request: measured" in text:
            found = re.search(r"^totals: (\d+)", text, re.MULTILINE)
            if found:
                return int(found.group(1)) / n
    raise RuntimeError(f"{row}, {variant}: no count\n{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="executions counted per cell")
    parser.add_argument("--jobs", type=int, default=2, help="cells counted at once")
    parser.add_argument("--only", help="rows whose name contains this")
    parser.add_argument("--variants", help="comma-separated variants (default: all)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    _helper()
    rows = [r for r in ROWS if args.only is None or args.only in r]
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    counts: dict[tuple[str, str], float] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        concurrent.futures.ThreadPoolExecutor(args.jobs) as pool,
    ):
        futures = {
            pool.submit(_count, row, variant, args.n, Path(tmp)): (row, variant)
            for row in rows
            for variant in variants
        }
        for future in concurrent.futures.as_completed(futures):
            counts[futures[future]] = future.result()
            row, variant = futures[future]
            print(f"  {row}, {variant}: {counts[row, variant] / 1e6:.3f} M", file=sys.stderr)
    print(f"\nInstructions per execution (callgrind, SQLite, {args.n} counted per cell):\n")
    print("| row | " + " | ".join(variants) + " |")
    print("| --- |" + " --- |" * len(variants))
    for row in rows:
        base = counts.get((row, "off"))
        cells = []
        for variant in variants:
            value = counts[row, variant]
            if variant == "off" or base is None:
                cells.append(f"{value / 1e6:.2f} M")
            else:
                cells.append(f"{value / 1e6:.2f} M ({(value - base) / base * 100:+.1f} %)")
        print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
