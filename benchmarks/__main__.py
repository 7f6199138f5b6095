"""Run jobrunner's benchmarks: ``python -m benchmarks <name>|all [--quick] [--repeat N]``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

import sqlalchemy as sa

from ._harness import (
    DEFAULT_SERVER,
    ROOT,
    SERVER_ENV,
    Bench,
    Options,
    console,
    load_average,
    started_at,
)

#: Every benchmark, in the order ``all`` runs them; missing modules are skipped with a note.
BENCHMARKS = (
    "throughput",
    "pool",
    "loop_lag",
    "memory",
    "prune",
    "reads",
    "dashboard",
    "celery_overhead",
    "observability",
    "rivals",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="benchmark to run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run (smoke test)")
    parser.add_argument("--repeat", type=int, help="runs per measurement (default 3; quick 1)")
    parser.add_argument(
        "--json-out", type=Path, help="JSON lines file (default .bench/latest.jsonl)"
    )
    parser.add_argument(
        "--server-url",
        help=f"PostgreSQL server for scratch databases (default ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--profile", action="store_true", help="throughput: also profile AsyncJobRunner"
    )
    return parser


def _options(args: argparse.Namespace) -> Options:
    server = args.server_url or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    return Options(
        quick=args.quick,
        repeat=args.repeat or (1 if args.quick else 3),
        server_url=sa.make_url(server),
        json_out=args.json_out or ROOT / ".bench" / "latest.jsonl",
        profile=args.profile,
    )


def _present(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = _options(args)
    names = [n for n in BENCHMARKS if _present(n)] if args.name == "all" else [args.name]
    options.json_out.parent.mkdir(parents=True, exist_ok=True)
    mode = "quick" if options.quick else "full"
    console.print(
        f"[bold]jobrunner benchmarks[/] {started_at()} ({mode}, {options.repeat} run(s) each, "
        f"{os.cpu_count()} CPUs, load average {load_average()}, SQLAlchemy {sa.__version__})"
    )
    failed: list[str] = []
    start = time.perf_counter()
    with options.json_out.open("w") as out:
        for name in BENCHMARKS if args.name == "all" else names:
            if name not in names:
                console.print(f"[yellow]{name}: benchmarks/{name}.py is not there yet; skipped[/]")
                continue
            console.rule(name)
            t0 = time.perf_counter()
            try:
                importlib.import_module(f"benchmarks.{name}").run(Bench(name, options, out))
            except Exception:
                traceback.print_exc()
                failed.append(name)
            console.print(f"[dim]{name} took {time.perf_counter() - t0:.0f}s[/]")
    total = time.perf_counter() - start
    console.print(f"JSON lines: {options.json_out}; total {total:.0f}s")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
