"""Helpers shared by tests: a user table phases write to, and counters."""

from __future__ import annotations

import threading

import sqlalchemy as sa

user_metadata = sa.MetaData()
notes = sa.Table(
    "test_notes",
    user_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("text", sa.String(200), nullable=False),
)


def make_notes_table(url: str) -> None:
    """Create (empty) the user table the test jobs write to."""
    engine = sa.create_engine(sa.make_url(url).set(
        drivername="postgresql+psycopg" if url.startswith("postgres") else "sqlite"))
    with engine.begin() as conn:
        user_metadata.drop_all(conn)
        user_metadata.create_all(conn)
    engine.dispose()


def note_texts(url: str) -> list[str]:
    """Everything in the user table, in insertion order."""
    engine = sa.create_engine(sa.make_url(url).set(
        drivername="postgresql+psycopg" if url.startswith("postgres") else "sqlite"))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(notes.c.text).order_by(notes.c.id)).scalars().all()
    engine.dispose()
    return list(rows)


class Counter:
    """A thread-safe counter of side effects."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def bump(self) -> int:
        with self._lock:
            self.value += 1
            return self.value
