"""Module-level jobs: importable by handler path, as a worker in another process sees them."""

from __future__ import annotations

from pydantic import BaseModel

from jobrunner import PhasedJob


class Greet(PhasedJob):
    """Says hello; the smallest real job."""

    name = "tests.greet"

    class Args(BaseModel):
        who: str

    def execute(self, args: Args) -> str:
        return f"hello {args.who}"


class AsyncGreet(PhasedJob):
    """Async twin of Greet."""

    name = "tests.async_greet"

    class Args(BaseModel):
        who: str

    async def execute(self, args: Args) -> str:
        return f"hello {args.who}"
