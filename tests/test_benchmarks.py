"""Smoke test of the benchmarks: ``python -m benchmarks all --quick`` runs and reports.

No numbers are asserted: the benchmarks must run here, not meet their targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from benchmarks.__main__ import BENCHMARKS, _present

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "benchmark", "system", "variant", "n", "concurrency", "seconds", "executions_per_s",
    "ms_per_execution", "ratio_to_floor", "sqlalchemy",
}  # fmt: skip


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_benchmarks_run_and_write_json_lines(pg_server: sa.URL, tmp_path: Path) -> None:
    """Every present benchmark runs in quick mode, exits 0 and writes its JSON lines."""
    out = tmp_path / "bench.jsonl"
    env = {
        **os.environ,
        "JOBRUNNER_BENCH_SERVER_URL": pg_server.render_as_string(hide_password=False),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "all", "--quick", "--json-out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    measurements = [line for line in lines if "note" not in line]
    for line in measurements:
        assert line.keys() >= FIELDS, sorted(FIELDS - line.keys())
    seen = {line["benchmark"] for line in measurements}
    assert seen == {name for name in BENCHMARKS if _present(name)}
