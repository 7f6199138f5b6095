"""Jobs and helpers for the dashboard tests: hostile names and values, failures to retry."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from jobrunner import JobRunner, PhasedJob, Registry, RetryPolicy
from jobrunner._schema import executions

HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"


class Echo(PhasedJob):
    """Returns its args (HTML included) as its result."""

    name = "web.echo"
    queue = "mail"

    class Args(BaseModel):
        text: str

    def execute(self, args: Args) -> dict[str, str]:
        return {"echo": args.text}


class Fail(PhasedJob):
    """Fails with the message it is given; two attempts, no wait between them."""

    name = "web.fail"
    retry = RetryPolicy(max_attempts=2, wait_initial=0, jitter=0, retry_on=(ValueError,))
    max_concurrency = 3

    class Args(BaseModel):
        message: str

    def execute(self, args: Args) -> None:
        raise ValueError(args.message)


class Hostile(PhasedJob):
    """A job whose very name is markup."""

    name = f"web.{HOSTILE}"
    queue = "<i>q</i>"

    class Args(BaseModel):
        text: str

    def execute(self, args: Args) -> None:
        raise RuntimeError(args.text)


def registry() -> Registry:
    return Registry([Echo, Fail, Hostile])


def seed(runner: JobRunner) -> dict[str, Any]:
    """A few executions of each kind; their ids by what they are."""
    ok = runner.run(Echo, {"text": HOSTILE})
    failed = runner.run(Fail, {"message": f"boom {HOSTILE}"})
    hostile = runner.run(Hostile, {"text": HOSTILE})
    pending = runner.submit(Echo, {"text": "later"})
    return {"ok": ok.id, "failed": failed.id, "hostile": hostile.id, "pending": pending}


def set_traceback(runner: JobRunner, execution_id: Any, text: str) -> None:
    with runner.engine.begin() as conn:
        conn.execute(
            sa.update(executions).where(executions.c.id == execution_id)
            .values(error_traceback=text)
        )


def csrf_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """A real uvicorn server on a free port in a thread; its base URL.

    The socket is bound and listening before the server starts, so a client may connect
    at once: the kernel queues the connection until uvicorn accepts it.
    """
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        # Open event streams never end by themselves: do not wait for them.
        server.force_exit = True
        server.should_exit = True
        thread.join()
        sock.close()
