"""Instructions per inline execution on PostgreSQL, counted by callgrind (issue 18).

``python -m benchmarks.hot_instructions [ae|alr|se|slr] ...`` runs, for each kind, this
module under ``valgrind --tool=callgrind`` twice (100 and 300 inline ``run()`` calls after
50 to warm up) and prints (count(300) - count(100)) / 200: the instructions of one
execution, connections and imports excluded, independent of the machine's load.

Kinds: ``ae`` ``AsyncJobRunner`` (asyncpg), execute only; ``alr`` the same with empty
session ``load``/``record``; ``se``/``slr`` ``JobRunner`` (psycopg). The database is a
scratch one on ``$JOBRUNNER_BENCH_SERVER_URL`` (default the local server), dropped afterwards.
Needs ``valgrind``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid

import sqlalchemy as sa

from ._harness import DEFAULT_SERVER, SERVER_ENV

KINDS = ("ae", "alr", "se", "slr")


def _child(kind: str, url: str, n: int) -> None:
    from jobrunner import AsyncJobRunner, JobRunner, Registry

    from ._jobs import AsyncNoop, AsyncNoopPhases, SyncNoop, SyncNoopPhases

    base = sa.make_url(url)
    if kind.startswith("a"):
        job: type = AsyncNoopPhases if kind == "alr" else AsyncNoop

        async def main() -> None:
            runner = AsyncJobRunner(
                base.set(drivername="postgresql+asyncpg"), registry=Registry([job])
            )
            for _ in range(50 + n):
                await runner.run(job)
            await runner.aclose()

        asyncio.run(main())
        return
    job = SyncNoopPhases if kind == "slr" else SyncNoop
    runner = JobRunner(base.set(drivername="postgresql+psycopg"), registry=Registry([job]))
    for _ in range(50 + n):
        runner.run(job)
    runner.close()


def _count(kind: str, url: str, n: int) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-m", "benchmarks.hot_instructions", "--child", kind, url, str(n)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2], int(argv[3]))
        return
    import os

    from jobrunner._schema import metadata

    server = sa.make_url(os.environ.get(SERVER_ENV, DEFAULT_SERVER))
    admin = sa.create_engine(
        server.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    name = f"jobrunner_bench_hot_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = server.set(database=name, drivername="postgresql")
    try:
        engine = sa.create_engine(url.set(drivername="postgresql+psycopg"))
        metadata.create_all(engine)
        engine.dispose()
        for kind in argv or list(KINDS):
            low, high = _count(kind, str(url), 100), _count(kind, str(url), 300)
            print(f"{kind}: {(high - low) / 200 / 1e6:.2f} M instructions per execution")
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    main(sys.argv[1:])
