"""Quickstart: a three-phase job on the embedded SQLite database, with retries.

To run:
    make demo                              # once: creates .venv and installs jobrunner
    .venv/bin/python examples/quickstart.py

It writes ``quickstart.db`` in the current directory: your ``signups`` table and
jobrunner's ``jobrunner_executions`` / ``jobrunner_attempts`` tables. Run it again as often
as you like; it starts from a clean ``signups`` table each time.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.orm import Session

from jobrunner import JobRunner, PhasedJob, RetryPolicy, metadata

app_metadata = sa.MetaData()
signups = sa.Table(
    "signups",
    app_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.String(200), nullable=False),
    sa.Column("welcome_message_id", sa.String(100)),
)


class SendWelcomeEmail(PhasedJob):
    """Reads a signup, calls the mail provider with no session held, stores the message id."""

    name = "signups.send_welcome_email"
    retry = RetryPolicy(max_attempts=3, wait_initial=0.1, jitter=0.1, retry_on=(ConnectionError,))

    class Args(BaseModel):
        signup_id: int

    def load(self, session: Session, args: Args) -> dict[str, Any]:
        # Phase 1, its own transaction: read inputs and return plain data.
        query = sa.select(signups.c.email).where(signups.c.id == args.signup_id)
        return {"signup_id": args.signup_id, "email": session.execute(query).scalar_one()}

    def execute(self, loaded: dict[str, Any]) -> dict[str, Any]:
        # Phase 2, no session held: the slow network call.
        time.sleep(0.05)  # stands in for the mail provider's API
        return {"signup_id": loaded["signup_id"], "message_id": f"msg-{loaded['signup_id']}"}

    def record(self, session: Session, result: dict[str, Any]) -> None:
        # Phase 3, a fresh transaction: committed together with the "succeeded" status.
        session.execute(
            sa.update(signups)
            .where(signups.c.id == result["signup_id"])
            .values(welcome_message_id=result["message_id"])
        )


class FlakyWelcomeEmail(SendWelcomeEmail):
    """The same job against a provider that fails twice before answering."""

    name = "signups.flaky_welcome_email"

    def execute(self, loaded: dict[str, Any]) -> dict[str, Any]:
        if self.attempt < 3:
            raise ConnectionError("mail provider did not answer")
        return super().execute(loaded)


def prepare(runner: JobRunner) -> None:
    """Create jobrunner's tables and the signups table, holding one signup."""
    runner.create_schema()
    with runner.engine.begin() as conn:
        app_metadata.create_all(conn)
        conn.execute(sa.delete(signups))
        conn.execute(sa.insert(signups), [{"id": 1, "email": "ada@example.com"}])


def main() -> None:
    """Run both jobs and print what the database recorded."""
    executions_table = metadata.tables["jobrunner_executions"]
    with JobRunner("sqlite:///quickstart.db") as runner:
        prepare(runner)

        execution = runner.run(SendWelcomeEmail, {"signup_id": 1})
        print(f"{execution.job}: {execution.status}, result {execution.result}")
        print(
            f"  load {execution.load_ms:.1f} ms, execute {execution.execute_ms:.1f} ms, "
            f"record {execution.record_ms:.1f} ms"
        )

        flaky = runner.run(FlakyWelcomeEmail, {"signup_id": 1})
        print(f"{flaky.job}: {flaky.status} on attempt {flaky.attempt}")
        for attempt in runner.attempts(flaky.id):
            error = ""
            if attempt.error_type:
                error = f" ({attempt.error_type}: {attempt.error_message})"
            print(f"  attempt {attempt.number}: {attempt.status}{error}")

        with runner.engine.connect() as conn:
            print("signups:", conn.execute(sa.select(signups)).all())
            rows = conn.execute(
                sa.select(executions_table.c.job, executions_table.c.status)
                .where(executions_table.c.id.in_([execution.id, flaky.id]))
                .order_by(executions_table.c.created_at)
            ).all()
        for job, status in rows:
            print(f"jobrunner_executions: {job} {status}")


if __name__ == "__main__":
    main()
