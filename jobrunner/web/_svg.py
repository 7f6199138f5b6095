"""Geometry for the two pictures, drawn server-side as SVG (no chart library).

- The phase timeline of an execution: one row per attempt on a shared time axis, the
  attempt's load / execute / record as consecutive bars from its start over a pale bar
  of the whole attempt, and the wait before it (its retry backoff) as a thin bar from
  the previous attempt's end.
- Executions per minute over the last hour, stacked by outcome.

Pure functions over plain values; the templates only place the rectangles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime

from .._records import Attempt

WIDTH = 720
LABEL = 90
ROW = 22
BAR = 14


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rect:
    """One bar: where it is, what it is (a CSS class) and its tooltip."""

    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Picture:
    """Bars, row labels and the size of the drawing."""

    width: int
    height: int
    rects: list[Rect]
    labels: list[tuple[float, str]]
    caption: str


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.1f} ms" if ms < 10_000 else f"{seconds:,.1f} s"


def timeline(attempts: Sequence[Attempt]) -> Picture | None:
    """The attempts' phases on one time axis; None without attempts."""
    if not attempts:
        return None
    t0 = min(a.started_at for a in attempts)
    t1 = max(a.finished_at for a in attempts)
    span = max((t1 - t0).total_seconds(), 1e-6)
    scale = (WIDTH - LABEL - 10) / span
    rects: list[Rect] = []
    labels: list[tuple[float, str]] = []
    previous_end: datetime | None = None
    for row, attempt in enumerate(attempts):
        y = 4 + row * ROW
        labels.append((y + BAR - 3, f"#{attempt.number} {attempt.status.value}"))
        if previous_end is not None and attempt.started_at > previous_end:
            wait = (attempt.started_at - previous_end).total_seconds()
            x = LABEL + (previous_end - t0).total_seconds() * scale
            rects.append(
                Rect(
                    x=x,
                    y=y + BAR / 2 - 1,
                    width=max(wait * scale, 1),
                    height=2,
                    kind="wait",
                    title=f"retry wait {_ms(wait)}",
                )
            )
        x = LABEL + (attempt.started_at - t0).total_seconds() * scale
        seconds = (attempt.finished_at - attempt.started_at).total_seconds()
        rects.append(  # the whole attempt, behind its phases: what the phases leave out
            Rect(
                x=x,
                y=y,
                width=max(seconds * scale, 1),
                height=BAR,
                kind="span",
                title=f"attempt {attempt.number}: {attempt.status.value} after {_ms(seconds)}",
            )
        )
        rects.extend(_phases(attempt, x, y, scale))
        previous_end = attempt.finished_at
    return Picture(
        width=WIDTH,
        height=8 + len(attempts) * ROW,
        rects=rects,
        labels=labels,
        caption=f"{len(attempts)} attempt(s) over {_ms(span)}",
    )


def _phases(attempt: Attempt, x: float, y: float, scale: float) -> Iterable[Rect]:
    phases = [
        ("load", attempt.load_ms),
        ("execute", attempt.execute_ms),
        ("record", attempt.record_ms),
    ]
    known = [(name, ms) for name, ms in phases if ms is not None]
    if not known:  # nothing timed (e.g. abandoned): the attempt's whole span
        seconds = (attempt.finished_at - attempt.started_at).total_seconds()
        yield Rect(
            x=x,
            y=y,
            width=max(seconds * scale, 1),
            height=BAR,
            kind=attempt.status.value,
            title=f"{attempt.status.value} {_ms(seconds)}",
        )
        return
    for name, ms in known:
        width = max(ms / 1000 * scale, 1)
        yield Rect(x=x, y=y, width=width, height=BAR, kind=name, title=f"{name} {ms:,.1f} ms")
        x += ms / 1000 * scale


#: Outcomes the chart stacks, bottom first, and the statuses each counts.
OUTCOMES = (
    ("succeeded", ("succeeded",)),
    ("failed", ("failed", "timed_out")),
    ("cancelled", ("cancelled",)),
)
CHART_HEIGHT = 120


def per_minute_chart(
    counts: Iterable[tuple[int, str, int]], now_minute: int, minutes: int = 60
) -> Picture:
    """Stacked bars of finishes per minute for the ``minutes`` up to ``now_minute``."""
    buckets: dict[int, dict[str, int]] = {}
    outcome_of = {s: name for name, statuses in OUTCOMES for s in statuses}
    for minute, status, n in counts:
        age = now_minute - minute
        if 0 <= age < minutes and status in outcome_of:
            bucket = buckets.setdefault(age, {})
            bucket[outcome_of[status]] = bucket.get(outcome_of[status], 0) + n
    top = max((sum(b.values()) for b in buckets.values()), default=0) or 1
    step = (WIDTH - 40) / minutes
    rects: list[Rect] = []
    for age, bucket in buckets.items():
        x = 40 + (minutes - 1 - age) * step
        base = float(CHART_HEIGHT)
        for name, _ in OUTCOMES:
            n = bucket.get(name, 0)
            if not n:
                continue
            height = max(n / top * (CHART_HEIGHT - 10), 1)
            base -= height
            rects.append(
                Rect(
                    x=x,
                    y=base,
                    width=max(step - 1, 1),
                    height=height,
                    kind=name,
                    title=f"{age} min ago: {n:,} {name}",
                )
            )
    total = sum(sum(b.values()) for b in buckets.values())
    return Picture(
        width=WIDTH,
        height=CHART_HEIGHT + 16,
        rects=rects,
        labels=[(10, f"{top:,}"), (CHART_HEIGHT, "0")],
        caption=f"{total:,} finished in the last {minutes} minutes",
    )
