"""Where AsyncJobRunner's time goes: pyinstrument over sequential no-op executions.

Writes ``.bench/profile-async-runner.html`` and ``.txt`` and prints two tables: wall time
per execution by the innermost package each sample was in (time blocked in ``epoll`` is
waiting on PostgreSQL), and the functions with the most self time.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import sqlalchemy as sa
from pyinstrument import Profiler
from pyinstrument.frame import Frame
from rich.table import Table

from jobrunner import AsyncJobRunner, Registry

from ._harness import ROOT, console
from ._jobs import AsyncNoop, truncate

PACKAGES = (
    "jobrunner",
    "sqlalchemy",
    "asyncpg",
    "tenacity",
    "pydantic",
    "greenlet",
    "asyncio",
    "uuid",
    "json",
    "traceback",
    "contextlib",
    "logging",
    "datetime",
)


def profile_async_runner(url: sa.URL, n: int) -> dict[str, float]:
    """Profile ``n`` sequential no-op runs; returns ms per execution by package."""
    truncate(url)
    profiler = Profiler(interval=0.001, async_mode="disabled")
    asyncio.run(_runs(url, n, profiler))
    session = profiler.last_session
    assert session is not None
    out = ROOT / ".bench"
    out.mkdir(exist_ok=True)
    (out / "profile-async-runner.html").write_text(profiler.output_html())
    (out / "profile-async-runner.txt").write_text(
        profiler.output_text(unicode=True, color=False, show_all=False)
    )
    root = session.root_frame()
    assert root is not None
    by_package: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    _walk(root, None, by_package, by_function, inclusive)
    per_exec = {k: 1000 * v / n for k, v in by_package.most_common()}
    _print(per_exec, n)
    _print_functions("top functions by self time", by_function.most_common(15), n)
    _print_functions("jobrunner functions, inclusive time", inclusive.most_common(15), n)
    console.print(f"[dim]profile written to {out}/profile-async-runner.html and .txt[/]")
    return per_exec


async def _runs(url: sa.URL, n: int, profiler: Profiler) -> None:
    url = url.set(drivername="postgresql+asyncpg")
    runner = AsyncJobRunner(url, registry=Registry([AsyncNoop]))
    try:
        for _ in range(20):
            await runner.run(AsyncNoop)
        profiler.start()
        for _ in range(n):
            await runner.run(AsyncNoop)
        profiler.stop()
    finally:
        await runner.aclose()


def _package(frame: Frame) -> str | None:
    path = (frame.file_path or "").replace("\\", "/")
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/jobrunner/" in path and "/site-packages/" not in path:
        return "jobrunner"
    if "/benchmarks/" in path:
        return "benchmarks"
    if path.startswith("<") or not path:
        return None
    name = path.rsplit("/", 1)[-1].removesuffix(".py")
    parent = path.rsplit("/", 2)[-2] if path.count("/") >= 2 else ""
    return parent if parent in PACKAGES else f"stdlib:{name}"


def _walk(
    frame: Frame,
    inherited: str | None,
    by_package: collections.Counter[str],
    by_function: collections.Counter[str],
    inclusive: collections.Counter[str],
    on_stack: frozenset[str] = frozenset(),
) -> None:
    own = _package(frame) or inherited or "other"
    name = f"{frame.function} ({frame.file_path_short or '?'}:{frame.line_no})"
    if own == "jobrunner" and name not in on_stack:  # count recursion once
        inclusive[name] += frame.time
        on_stack = on_stack | {name}
    self_time = frame.total_self_time  # includes its synthetic [self]/[await] children
    if self_time:
        label = own
        if frame.function.endswith(("poll", "select")) and (frame.file_path or "<").startswith("<"):
            label = "waiting for PostgreSQL (epoll)"
        by_package[label] += self_time
        by_function[name] += self_time
    for child in frame.children:
        if not child.is_synthetic:
            _walk(child, own, by_package, by_function, inclusive, on_stack)


def _print(per_package: dict[str, float], n: int) -> None:
    total = sum(per_package.values())
    table = Table(title=f"AsyncJobRunner profile: ms per no-op execution ({n:,} sequential)")
    table.add_column("innermost package")
    table.add_column("ms/exec", justify="right")
    table.add_column("share", justify="right")
    for name, ms in per_package.items():
        if ms >= 0.01:
            table.add_row(name, f"{ms:.3f}", f"{100 * ms / total:.0f}%")
    table.add_row("total", f"{total:.3f}", "100%")
    console.print(table)


def _print_functions(title: str, rows: list[tuple[str, float]], n: int) -> None:
    table = Table(title=f"{title} (ms per execution)")
    table.add_column("function")
    table.add_column("ms/exec", justify="right")
    for name, seconds in rows:
        table.add_row(name, f"{1000 * seconds / n:.3f}")
    console.print(table)


def summary(per_package: dict[str, Any]) -> str:
    """One line for notes: the biggest packages."""
    return ", ".join(f"{k} {v:.2f} ms" for k, v in list(per_package.items())[:5])
