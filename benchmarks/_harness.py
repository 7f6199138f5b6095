"""The benchmark harness: options, scratch databases, repeated measurements, tables, JSON lines.

A benchmark is a module ``benchmarks/<name>.py`` with a docstring and one function::

    def run(bench: Bench) -> None:
        n = bench.size(full=2_000, quick=100)          # quick mode runs far fewer
        with bench.scratch_database() as url:          # CREATE DATABASE ... / DROP ... (FORCE)
            floor = bench.measure(system="asyncpg", variant="floor", n=n, concurrency=8,
                                  fn=lambda: time_it_somehow(url, n))   # -> seconds | Sample
            bench.measure(system="jobrunner", variant="AsyncJobRunner", n=n, concurrency=8,
                          fn=..., ratio_to=floor)
        bench.table("title")                           # prints this benchmark's rows
        bench.note("target X: met / not met because ...")

``fn`` is called ``bench.repeat`` times (default 3, 1 with ``--quick``); it times only what it
measures and returns the seconds, or a :class:`Sample` with extra numbers (pool waits, lag
percentiles, RSS...). Each measurement becomes one JSON line (see :meth:`Measurement.as_json`)
in the run's JSON file; ``ratio_to`` names the floor measured in the same run, and the line
carries ``ratio_to_floor`` = this rate / the floor's rate. :meth:`Bench.ameasure` is the same
for ``async`` functions, run on the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

SERVER_ENV = "JOBRUNNER_BENCH_SERVER_URL"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parent.parent

#: Wide enough for the tables when output goes to a file or a pipe (CI logs, the smoke test).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Command-line options shared by every benchmark."""

    quick: bool = False
    repeat: int = 3
    server_url: sa.URL = dataclasses.field(default_factory=lambda: sa.make_url(DEFAULT_SERVER))
    json_out: Path = ROOT / ".bench" / "latest.jsonl"
    profile: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """One timed repetition: seconds, plus any extra numbers worth reporting."""

    seconds: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(kw_only=True)
class Measurement:
    """All repetitions of one (system, variant) measurement, summarised."""

    benchmark: str
    system: str
    variant: str
    n: int
    concurrency: int
    samples: list[Sample]
    floor: Measurement | None = None
    unit: str = "executions"

    @property
    def seconds(self) -> list[float]:
        return [s.seconds for s in self.samples]

    @property
    def rates(self) -> list[float]:
        return [self.n / s for s in self.seconds if s > 0] if self.n else []

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def ratio_to_floor(self) -> float | None:
        if self.floor is None or self.floor.median_rate is None or self.median_rate is None:
            return None
        return self.median_rate / self.floor.median_rate

    def extra(self, key: str) -> Any:
        """Median of a numeric extra over the repetitions (else the last value)."""
        values = [s.extra[key] for s in self.samples if key in s.extra]
        numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numeric and len(numeric) == len(values):
            return statistics.median(numeric)
        return values[-1] if values else None

    def as_json(self, options: Options) -> dict[str, Any]:
        """The JSON line of this measurement."""
        rates = self.rates
        keys = dict.fromkeys(k for s in self.samples for k in s.extra)
        return {
            "benchmark": self.benchmark,
            "system": self.system,
            "variant": self.variant,
            "n": self.n,
            "concurrency": self.concurrency,
            "repeat": len(self.samples),
            "seconds": self.median_seconds,
            "seconds_min": min(self.seconds),
            "seconds_max": max(self.seconds),
            "executions_per_s": self.median_rate,
            "executions_per_s_min": min(rates) if rates else None,
            "executions_per_s_max": max(rates) if rates else None,
            "ms_per_execution": 1000 * self.median_seconds / self.n if self.n else None,
            "ratio_to_floor": self.ratio_to_floor,
            "floor": f"{self.floor.system} {self.floor.variant}" if self.floor else None,
            "extra": {k: self.extra(k) for k in keys},
            "samples": [{"seconds": s.seconds, **s.extra} for s in self.samples],
            "quick": options.quick,
            **environment(),
        }


@functools.cache
def environment() -> dict[str, Any]:
    """What ran the benchmark: versions and machine, repeated on every JSON line."""
    return {
        "sqlalchemy": sa.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def load_average() -> str:
    """The 1/5/15-minute load average, to tell a quiet machine from a busy one."""
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "?"


class Bench:
    """What a benchmark's ``run()`` gets: sizes, scratch databases, measurements, output."""

    def __init__(self, name: str, options: Options, out: TextIO) -> None:
        self.name = name
        self.options = options
        self.measurements: list[Measurement] = []
        self.notes: list[str] = []
        self._out = out

    @property
    def quick(self) -> bool:
        return self.options.quick

    @property
    def repeat(self) -> int:
        return self.options.repeat

    def size(self, *, full: int, quick: int) -> int:
        """``full`` normally, ``quick`` with ``--quick``."""
        return quick if self.quick else full

    # -- databases -------------------------------------------------------------------------

    def server_url(self, driver: str = "psycopg") -> sa.URL:
        """The PostgreSQL server URL (maintenance database) with ``driver``."""
        return self.options.server_url.set(drivername=f"postgresql+{driver}")

    @contextlib.contextmanager
    def scratch_database(self) -> Iterator[sa.URL]:
        """A new PostgreSQL database for this benchmark, dropped (FORCE) afterwards.

        Yields its URL without a driver (``postgresql://...``); pick one with
        ``url.set(drivername="postgresql+asyncpg")``. No other database is touched.
        """
        name = f"jobrunner_bench_{self.name}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(
            self.server_url(), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield self.options.server_url.set(drivername="postgresql", database=name)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    # -- measuring -------------------------------------------------------------------------

    def measure(
        self,
        *,
        system: str,
        variant: str,
        n: int,
        concurrency: int,
        fn: Callable[[], float | Sample],
        ratio_to: Measurement | None = None,
        repeat: int | None = None,
        unit: str = "executions",
    ) -> Measurement:
        """Call ``fn`` ``repeat`` times (default ``bench.repeat``) and record the results."""
        samples, runs = [], repeat or self.repeat
        for i in range(runs):
            self._progress(system, variant, i, runs)
            samples.append(_sample(fn()))
        return self._record(system, variant, n, concurrency, samples, ratio_to, unit)

    async def ameasure(
        self,
        *,
        system: str,
        variant: str,
        n: int,
        concurrency: int,
        fn: Callable[[], Awaitable[float | Sample]],
        ratio_to: Measurement | None = None,
        repeat: int | None = None,
        unit: str = "executions",
    ) -> Measurement:
        """:meth:`measure` for an ``async`` ``fn``, awaited on the running loop."""
        samples, runs = [], repeat or self.repeat
        for i in range(runs):
            self._progress(system, variant, i, runs)
            samples.append(_sample(await fn()))
        return self._record(system, variant, n, concurrency, samples, ratio_to, unit)

    def record(
        self,
        *,
        system: str,
        variant: str,
        n: int,
        concurrency: int,
        samples: list[Sample],
        ratio_to: Measurement | None = None,
        unit: str = "executions",
    ) -> Measurement:
        """Record samples taken elsewhere (e.g. in interleaved rounds, one per round)."""
        return self._record(system, variant, n, concurrency, samples, ratio_to, unit)

    def _progress(self, system: str, variant: str, i: int, runs: int) -> None:
        console.print(f"[dim]  {self.name}: {system} {variant} (run {i + 1}/{runs})[/]")

    def _record(
        self,
        system: str,
        variant: str,
        n: int,
        concurrency: int,
        samples: list[Sample],
        ratio_to: Measurement | None,
        unit: str,
    ) -> Measurement:
        m = Measurement(
            benchmark=self.name,
            system=system,
            variant=variant,
            n=n,
            concurrency=concurrency,
            samples=samples,
            floor=ratio_to,
            unit=unit,
        )
        self.measurements.append(m)
        self._out.write(json.dumps(m.as_json(self.options), default=str) + "\n")
        self._out.flush()
        return m

    # -- reporting -------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A line printed under the table (targets met or not, TODOs) and kept as JSON."""
        self.notes.append(text)
        self._out.write(json.dumps({"benchmark": self.name, "note": text}) + "\n")
        self._out.flush()

    def table(self, title: str, extras: dict[str, str] | None = None) -> None:
        """Print this benchmark's measurements; ``extras`` maps extra keys to column titles."""
        extras = extras or {}
        table = Table(title=f"{title}  [dim](median and min-max over the runs)[/]")
        cols = ("system", "variant", "n", "conc", "runs", "seconds", "exec/s", "ms/exec", "x floor")
        for col in cols:
            table.add_column(col, justify="left" if col in ("system", "variant") else "right")
        for header in extras.values():
            table.add_column(header, justify="right")
        for m in self.measurements:
            table.add_row(*_cells(m), *(_fmt(m.extra(k)) for k in extras))
        console.print(table)
        for line in self.notes:
            console.print(f"  {line}")


def _sample(value: float | Sample) -> Sample:
    return value if isinstance(value, Sample) else Sample(seconds=float(value))


def _cells(m: Measurement) -> list[str]:
    secs, rates = m.seconds, m.rates
    spread = f" ({min(secs):.2f}-{max(secs):.2f})" if len(secs) > 1 else ""
    rate = m.median_rate
    rate_spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
    ratio = m.ratio_to_floor
    return [
        m.system,
        m.variant,
        f"{m.n:,}",
        str(m.concurrency),
        str(len(m.samples)),
        f"{m.median_seconds:.2f}{spread}",
        f"{rate:,.0f}{rate_spread}" if rate is not None else "-",
        f"{1000 * m.median_seconds / m.n:.2f}" if m.n else "-",
        f"{ratio:.2f}" if ratio is not None else "-",
    ]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (perf_counter)."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def run_async(coro: Awaitable[Any]) -> Any:
    """Run a benchmark's coroutine on a fresh loop (each benchmark owns its loops)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


def started_at() -> str:
    """An ISO timestamp for the header of a run."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def python_executable() -> str:
    """The interpreter running the benchmarks (subprocess workers use the same one)."""
    return sys.executable


@contextlib.contextmanager
def celery_worker(
    app: Any,
    *,
    module: str,
    node: str,
    concurrency: int,
    log_name: str,
    queues: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A prefork Celery worker subprocess, answering ``ping`` on entry, stopped on exit."""
    (ROOT / ".bench").mkdir(exist_ok=True)
    args = [sys.executable, "-m", "celery", "-A", module, "worker", "--pool=prefork",
            f"--concurrency={concurrency}", "-n", node]  # fmt: skip
    if queues:
        args += ["-Q", ",".join(queues)]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=WARNING"]
    with (ROOT / ".bench" / log_name).open("w") as log:
        proc = subprocess.Popen(
            args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(env or os.environ)
        )
        try:
            deadline = time.monotonic() + 60
            while not app.control.ping(destination=[node], timeout=0.5):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Celery worker did not start; see .bench/{log_name}")
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

