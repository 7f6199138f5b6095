"""Find or start the real services the suite needs: PostgreSQL and Redis.

PostgreSQL, in order: ``JOBRUNNER_TEST_DATABASE_URL``; a server answering on
127.0.0.1:5432; a throwaway cluster from the installed ``initdb``/``pg_ctl`` (run as the
``postgres`` user when we are root); testcontainers when a Docker engine answers; else
None and the caller skips (or fails with ``JOBRUNNER_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

T = TypeVar("T")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: URL) -> bool:
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool,
                              connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def _pg_bin(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return candidates[-1] if candidates else None


class Cluster:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl): it may stop and start it."""

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.pg_ctl = pg_ctl
        self.datadir = tempfile.mkdtemp(prefix="jobrunner-pg-")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.datadir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.url = make_url(f"postgresql://postgres@127.0.0.1:{self.port}/postgres")
        subprocess.run([*self.as_user, initdb, "-D", self.datadir, "-A", "trust", "-U",
                        "postgres"], check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.datadir, "-w", "-l",
                        f"{self.datadir}/log", "-o",
                        f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off", "start"], check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends every session (a restart), ``immediate`` crashes."""
        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.datadir, "-w", "-m", mode,
                        "stop"], check=True, capture_output=True)

    def remove(self) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.datadir, "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(self.datadir, ignore_errors=True)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster | None]:
    """A new, started cluster (None without initdb/pg_ctl), removed afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        yield None
        return
    try:
        cluster = Cluster(initdb, pg_ctl)
    except (subprocess.CalledProcessError, OSError):
        yield None
        return
    try:
        cluster.start()
    except (subprocess.CalledProcessError, OSError):
        cluster.remove()
        yield None
        return
    try:
        yield cluster
    finally:
        cluster.remove()


@contextlib.contextmanager
def _throwaway_cluster() -> Iterator[URL | None]:
    with throwaway_cluster() as cluster:
        yield None if cluster is None else cluster.url


@contextlib.contextmanager
def _container() -> Iterator[URL | None]:
    try:
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-not-found]
    except ImportError:
        yield None
        return
    try:
        container = PostgresContainer("postgres:15").start()
    except Exception:  # no Docker engine answering
        yield None
        return
    try:
        yield make_url(container.get_connection_url())
    finally:
        container.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[URL | None, str]]:
    """(server URL, how it was found); URL is None when there is no PostgreSQL."""
    env = os.environ.get("JOBRUNNER_TEST_DATABASE_URL")
    if env:
        yield make_url(env), "JOBRUNNER_TEST_DATABASE_URL"
        return
    local = make_url("postgresql://postgres@127.0.0.1:5432/postgres")
    if port_open("127.0.0.1", 5432) and _answers(local):
        yield local, "local server on 127.0.0.1:5432"
        return
    with _throwaway_cluster() as url:
        if url is not None:
            yield url, "throwaway cluster from initdb/pg_ctl"
            return
    with _container() as url:
        if url is not None:
            yield url, "testcontainers"
            return
    yield None, (
        "no PostgreSQL: JOBRUNNER_TEST_DATABASE_URL unset, nothing on 127.0.0.1:5432, "
        "no initdb/pg_ctl installed and no Docker engine"
    )


@contextlib.contextmanager
def scratch_database(server: URL, prefix: str = "jobrunner_test") -> Iterator[URL]:
    """A new database on ``server``, dropped (with its connections) afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server.set(drivername="postgresql+psycopg"),
                             isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str | None, str]]:
    """(redis URL, how it was found): 127.0.0.1:6379 if it answers, else a throwaway one."""
    if port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0", "local server on 127.0.0.1:6379"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None, "no Redis on 127.0.0.1:6379 and no redis-server installed"
        return
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", "throwaway redis-server"
    finally:
        proc.terminate()
        proc.wait(10)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> int:
    """SIGTERM (a warm shutdown), then SIGKILL if it hangs; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def wait_for(condition: Callable[[], T], what: str, timeout: float = 120.0) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value
