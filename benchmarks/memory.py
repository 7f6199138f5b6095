"""memory: RSS before and after 100,000 no-op executions, SQLite file and PostgreSQL.

Each backend runs in a fresh child process (``benchmarks._memory_child``) so nothing else
in this process inflates its RSS: ``JobRunner`` on a SQLite file (sequential) and
``AsyncJobRunner`` on PostgreSQL (8 concurrent). Growth is RSS after the last execution
minus RSS after a warm-up (pool filled, statements compiled); the two children run at the
same time to keep ``make bench`` short (their speed does not matter here, their memory does).
Each is measured once: 100,000 executions three times would not fit the time budget.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ._harness import ROOT, Bench, Sample, python_executable

TARGET_MB = 20.0


def run(bench: Bench) -> None:
    n = bench.size(full=100_000, quick=300)
    warmup = bench.size(full=1_000, quick=50)
    with bench.scratch_database() as url, tempfile.TemporaryDirectory() as tmp:
        pg = url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        children = {
            ("SQLite file", "JobRunner", 1): _start(
                f"sqlite:///{Path(tmp) / 'm.db'}", "sync", n, warmup, 1
            ),
            ("PostgreSQL", "AsyncJobRunner", 8): _start(pg, "async", n, warmup, 8),
        }
        results = {key: _finish(proc) for key, proc in children.items()}
    for (backend, runner, conc), result in results.items():
        bench.measure(
            system=runner,
            variant=backend,
            n=n,
            concurrency=conc,
            fn=lambda r=result: _sample(r),
            repeat=1,
        )
    for m in bench.measurements:
        growth = m.extra("growth_mb")
        verdict = "met" if growth < TARGET_MB else "NOT met"
        bench.note(
            f"target RSS growth < {TARGET_MB:g} MB over {n:,} executions, {m.system} on "
            f"{m.variant}: {verdict} ({growth:+.1f} MB)"
        )
    bench.table(
        f"memory: RSS over {n:,} no-op executions (after {warmup:,} warm-up), one child each",
        {
            "rss_start_mb": "RSS start MB",
            "rss_warm_mb": "after warm-up",
            "rss_after_mb": "after n",
            "growth_mb": "growth MB",
        },
    )


def _start(url: str, kind: str, n: int, warmup: int, conc: int) -> subprocess.Popen[str]:
    argv = [python_executable(), "-m", "benchmarks._memory_child", url, kind, str(n)]
    return subprocess.Popen(
        [*argv, str(warmup), str(conc)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _sample(result: dict[str, Any]) -> Sample:
    after = result["curve"][-1][1]
    return Sample(
        seconds=result["seconds"],
        extra={
            "rss_start_mb": result["rss_start_mb"],
            "rss_warm_mb": result["rss_warm_mb"],
            "rss_after_mb": after,
            "growth_mb": after - result["rss_warm_mb"],
            "curve": result["curve"],
        },
    )
