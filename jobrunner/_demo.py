"""The demo: two jobs on the embedded SQLite file, one succeeding and one failing."""

from __future__ import annotations

import sqlalchemy as sa
from pydantic import BaseModel

from ._job import PhasedJob
from ._records import Execution
from ._retry import RetryPolicy
from ._runner import JobRunner

demo_metadata = sa.MetaData()
invoices = sa.Table(
    "demo_invoices",
    demo_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.String(100), nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
    sa.Column("pdf_url", sa.String(200)),
)


class RenderInvoice(PhasedJob):
    """Reads an invoice, renders it without a session held, stores the URL."""

    name = "demo.render_invoice"

    class Args(BaseModel):
        invoice_id: int

    def load(self, session: sa.orm.Session, args: Args) -> dict[str, object]:
        row = session.execute(sa.select(invoices).where(invoices.c.id == args.invoice_id)).one()
        return dict(row._mapping)

    def execute(self, invoice: dict[str, object]) -> dict[str, object]:
        # The slow part (PDF rendering, an S3 upload) runs with no connection held.
        url = f"https://files.example.com/invoices/{invoice['id']}.pdf"
        return {"invoice_id": invoice["id"], "pdf_url": url}

    def record(self, session: sa.orm.Session, result: dict[str, object]) -> None:
        session.execute(
            sa.update(invoices)
            .where(invoices.c.id == result["invoice_id"])
            .values(pdf_url=result["pdf_url"])
        )


class ChargeCard(PhasedJob):
    """Calls a payment provider that is down: retried, then failed, every attempt kept."""

    name = "demo.charge_card"
    retry = RetryPolicy(max_attempts=3, wait_initial=0.05, wait_max=0.2, jitter=0.0)

    class Args(BaseModel):
        invoice_id: int

    def execute(self, args: Args) -> None:
        raise ConnectionError("payment provider refused the connection (demo)")


def run_demo(url: str) -> list[Execution]:
    """Create the schema and demo data at ``url``, run both jobs, return the executions."""
    runner = JobRunner(url)
    try:
        runner.create_schema()
        with runner.engine.begin() as conn:
            demo_metadata.create_all(conn)
            if conn.execute(sa.select(sa.func.count()).select_from(invoices)).scalar() == 0:
                conn.execute(
                    sa.insert(invoices),
                    [
                        {"id": 1, "customer": "ACME", "amount_cents": 12_500},
                        {"id": 2, "customer": "Globex", "amount_cents": 9_900},
                    ],
                )
        return [
            runner.run(RenderInvoice, {"invoice_id": 1}),
            runner.run(ChargeCard, {"invoice_id": 2}),
        ]
    finally:
        runner.close()
