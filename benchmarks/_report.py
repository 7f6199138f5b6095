"""Markdown tables from a benchmark run's JSON lines, for ``docs/benchmarks.md``.

``python -m benchmarks._report .bench/latest.jsonl > tables.md``: one table per benchmark
(median, min-max over the runs, ratio to the floor, the extras that benchmark reports) and
its notes (targets met or not, TODOs) as a list under it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ._harness import _fmt

#: Extra columns shown per benchmark: JSON key -> header.
EXTRAS: dict[str, dict[str, str]] = {
    "throughput": {
        "cpu_ms": "client CPU ms/exec",
        "pool_size": "pool_size",
        "connects": "new conns",
    },
    "pool": {
        "connections": "connections",
        "waited": "waits > 1 ms",
        "max_wait_s": "max wait s",
        "timeouts": "pool timeouts",
        "failed": "failed",
    },
    "loop_lag": {
        "p50_ms": "p50 ms",
        "p99_ms": "p99 ms",
        "max_ms": "max ms",
        "cpu_overhead_pct": "CPU % of a core",
    },
    "memory": {
        "rss_start_mb": "RSS start MB",
        "rss_warm_mb": "after warm-up MB",
        "rss_after_mb": "after n MB",
        "growth_mb": "growth MB",
    },
    "prune": {"transactions": "transactions", "longest_tx_ms": "longest tx ms"},
    "rivals": {
        "enqueue_per_s": "enqueue/s",
        "drain_per_s": "drain/s",
        "cpu_ms": "client CPU ms/job",
        "commits": "commits/job",
        "wal_syncs": "WAL syncs/job",
        "wal_records": "WAL records/job",
    },
}


def render(lines: list[dict[str, Any]]) -> str:
    """All benchmarks of one run as Markdown."""
    order = list(dict.fromkeys(line["benchmark"] for line in lines))
    return "\n".join(_benchmark(name, lines) for name in order)


def _benchmark(name: str, lines: list[dict[str, Any]]) -> str:
    rows = [x for x in lines if x["benchmark"] == name and "note" not in x]
    notes = [x["note"] for x in lines if x["benchmark"] == name and "note" in x]
    extras = EXTRAS.get(name, {})
    head = ["system", "variant", "n", "conc", "runs", "seconds", "exec/s", "ms/exec", "x floor"]
    out = [f"#### `{name}`", "", _row([*head, *extras.values()]), _row(["---"] * (9 + len(extras)))]
    for r in rows:
        out.append(_row([*_cells(r), *(_fmt(r["extra"].get(k)) for k in extras)]))
    out += ["", *(f"- {note}" for note in notes), ""]
    return "\n".join(out)


def _cells(r: dict[str, Any]) -> list[str]:
    spread = r["repeat"] > 1
    secs = f"{r['seconds']:.2f}"
    if spread:
        secs += f" ({r['seconds_min']:.2f}-{r['seconds_max']:.2f})"
    rate, rates = r["executions_per_s"], ""
    if spread and rate is not None:
        rates = f" ({r['executions_per_s_min']:,.0f}-{r['executions_per_s_max']:,.0f})"
    ms = r["ms_per_execution"]
    ratio = r["ratio_to_floor"]
    return [
        r["system"],
        r["variant"],
        f"{r['n']:,}",
        str(r["concurrency"]),
        str(r["repeat"]),
        secs,
        f"{rate:,.0f}{rates}" if rate is not None else "-",
        f"{ms:.2f}" if ms is not None else "-",
        f"{ratio:.2f}" if ratio is not None else "-",
    ]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def main(argv: list[str]) -> None:
    lines = [json.loads(x) for x in Path(argv[0]).read_text().splitlines() if x.strip()]
    sys.stdout.write(render(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
