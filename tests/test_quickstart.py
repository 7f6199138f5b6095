"""The quickstart runs as written, from an empty folder, with the package installed (issue 17).

The page's convention, which :func:`quickstart_blocks` enforces: every fenced block is

- ```python title="NAME"```: a file to create, whole, under that name;
- ```bash```: commands, one a line, typed in order into one shell (exports and shell
  variables carry over, as in a reader's terminal);
- ```text```: output shown to the reader, not run.

The commands run in a fresh, empty ``tmp_path``, in one ``bash`` process, with this
environment's scripts directory (its ``python`` and ``jobrunner``) first on PATH and no
``JOBRUNNER_DATABASE_URL``: the SQLite default, as for a new user.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobrunner import metadata

from ._services import scratch_database

PAGE = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"
POSTGRES_HEADING = "## 6. PostgreSQL (optional)"
PAGE_URL = "postgresql://postgres@localhost/jobs"
JOB = "signups.send_welcome_email"

# Lines the test cannot type as written, and what stands in for them. Each must be on the
# page exactly (a changed line fails the test rather than being run unnoticed).
PROVIDED = {
    # The environment running this test has jobrunner installed, with the postgres extra
    # (as these lines would leave a new virtualenv), and its scripts come first on PATH.
    "python3 -m venv .venv",
    ". .venv/bin/activate",
    "pip install jobrunner",
    "pip install 'jobrunner[postgres]'",
    # The PostgreSQL run creates a scratch database instead of `jobs` (on whatever server
    # the suite found), and `export` names it in place of PAGE_URL.
    "createdb -h localhost -U postgres jobs",
}

_FENCE = re.compile(r"^```(?P<lang>\w*)(?P<attrs>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
_TITLE = re.compile(r'title="(?P<name>[^"]+)"')


@dataclasses.dataclass(frozen=True)
class File:
    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class Command:
    line: str


def quickstart_blocks(text: str) -> list[File | Command]:
    """The page's files and commands, in order; fails on a block that follows no convention."""
    steps: list[File | Command] = []
    for fence in _FENCE.finditer(text):
        lang, attrs, body = fence["lang"], fence["attrs"], fence["body"]
        title = _TITLE.search(attrs)
        if lang == "python" and title:
            steps.append(File(title["name"], body))
        elif lang == "bash" and not attrs.strip():
            lines = [line.strip() for line in body.splitlines()]
            steps += [Command(line) for line in lines if line and not line.startswith("#")]
        elif lang != "text":
            pytest.fail(f"```{lang}{attrs} block: neither a file, a command nor output")
    return steps


@dataclasses.dataclass
class Transcript:
    """What each command printed, in the order they ran."""

    ran: list[tuple[str, str, str]]  # (command, stdout, stderr)

    def outputs(self, command: str) -> list[tuple[str, str]]:
        """(stdout, stderr) of every run of ``command``, in order."""
        found = [(out, err) for line, out, err in self.ran if line == command]
        assert found, f"the quickstart no longer runs {command!r}"
        return found

    def stdout(self, command: str) -> list[str]:
        return [out for out, _ in self.outputs(command)]

    def stderr(self, command: str) -> list[str]:
        return [err for _, err in self.outputs(command)]


def run_quickstart(cwd: Path, *, postgres_url: str | None) -> Transcript:
    """Type the page into one bash in ``cwd``.

    Without ``postgres_url``: everything before the PostgreSQL section. With it: the files
    of the whole page (the reader made them in steps 2 and 3), then only the PostgreSQL
    section's commands, which need nothing else the earlier commands left behind.
    """
    text = PAGE.read_text(encoding="utf-8")
    assert POSTGRES_HEADING in text, "the quickstart lost its PostgreSQL section"
    assert PAGE_URL in text, "the quickstart's PostgreSQL URL changed; update PAGE_URL"
    before, postgres = text.split(POSTGRES_HEADING)
    every_line = {step.line for step in quickstart_blocks(text) if isinstance(step, Command)}
    assert not PROVIDED - every_line, f"no longer on the page: {sorted(PROVIDED - every_line)}"
    if postgres_url is None:
        steps = quickstart_blocks(before)
    else:
        steps = [step for step in quickstart_blocks(before) if isinstance(step, File)]
        steps += quickstart_blocks(postgres)

    marker = f"@@quickstart-{uuid.uuid4().hex}@@"
    script = ["set -euo pipefail"]
    commands: list[str] = []
    for step in steps:
        if isinstance(step, File):
            script.append(f"cat > {shlex.quote(step.name)} <<'{marker}'\n{step.text}{marker}")
            continue
        if step.line in PROVIDED:
            continue
        line = step.line
        if postgres_url is not None:
            line = line.replace(PAGE_URL, shlex.quote(postgres_url))
        script.append(f"echo {marker}; echo {marker} >&2")
        script.append(line)
        commands.append(step.line)

    environ = {k: v for k, v in os.environ.items()
               if k not in ("JOBRUNNER_DATABASE_URL", "JOBRUNNER_APP", "PYTHONPATH",
                            "MAIL_PROVIDER_REJECTS")}
    scripts = sysconfig.get_path("scripts")
    assert shutil.which("jobrunner", path=scripts), f"no jobrunner command in {scripts}"
    environ["PATH"] = os.pathsep.join([scripts, environ.get("PATH", "")])
    environ["COLUMNS"] = "100"  # a terminal wide enough for every column of the tables
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120)
    outs = done.stdout.split(marker + "\n")[1:]
    errs = done.stderr.split(marker + "\n")[1:]
    last = commands[len(outs) - 1] if outs else "(before the first command)"
    assert done.returncode == 0, (
        f"`{last}` exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    assert len(outs) == len(errs) == len(commands)
    return Transcript(list(zip(commands, outs, errs, strict=True)))


def executions(url: str) -> list[tuple[str, str, int, dict[str, object] | None]]:
    """(job, status, attempt, result) of every execution at ``url``, oldest first."""
    table = metadata.tables["jobrunner_executions"]
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            query = sa.select(table.c.job, table.c.status, table.c.attempt, table.c.result)
            return [tuple(row) for row in conn.execute(query.order_by(table.c.created_at))]
    finally:
        engine.dispose()


def listed(output: str, execution_id: str, status: str) -> bool:
    """Whether a `jobrunner list` table shows ``execution_id`` (its 8-digit prefix) so."""
    row = rf"^{execution_id[:8]}\s+{status}\s+{re.escape(JOB)}"
    return re.search(row, output, re.M) is not None


def test_quickstart_runs_as_written_on_sqlite(tmp_path: Path) -> None:
    """Steps 1 to 5 from an empty folder: every command exits 0 and does what the page says."""
    assert list(tmp_path.iterdir()) == []
    typed = run_quickstart(tmp_path, postgres_url=None)
    assert {p.name for p in tmp_path.iterdir()} - {"__pycache__"} == {
        "jobs.py", "welcome.py", "jobrunner.db"}

    # Step 3: the script prints the submitted execution's id; it is pending.
    [first_id] = typed.stdout("python welcome.py ada@example.com")
    first_id = str(uuid.UUID(first_id.strip()))
    pending, succeeded = typed.stdout("jobrunner list")
    assert listed(pending, first_id, "pending")
    # Step 4: the worker ran that execution, and the list shows it succeeded.
    ran, rerun = typed.stderr("jobrunner --app jobs worker --until-idle")
    assert f"execution {first_id} of {JOB} succeeded (attempt 1)" in ran
    assert listed(succeeded, first_id, "succeeded")

    # Step 5: a failure, shown, retried by hand and run again by a worker.
    [failed] = typed.stderr("MAIL_PROVIDER_REJECTS=1 jobrunner --app jobs worker --until-idle")
    assert f"of {JOB} ended failed in execute: PermissionError" in failed
    [failed_list] = typed.stdout("jobrunner list --status failed")
    [failed_id] = re.findall(rf"^([0-9a-f]{{8}})\s+failed\s+{re.escape(JOB)}", failed_list, re.M)
    assert failed_id != first_id[:8]
    before, after = typed.stdout("jobrunner show $id")
    assert failed_id in before and re.search(r"^status\s+failed\s+phase: execute", before, re.M)
    assert "PermissionError: the mail provider rejected our API key" in before
    [retried] = typed.stdout("jobrunner --app jobs retry $id")
    assert failed_id in retried and "pending again" in retried
    assert f"{failed_id}" in rerun and f"of {JOB} succeeded (attempt 2)" in rerun
    assert re.search(r"^status\s+succeeded", after, re.M)
    assert re.search(r"^attempt\s+2 of 4", after, re.M)

    # Nothing warned that a job lives in __main__: the layout the page shows is the fix.
    assert not any("__main__" in err for _, _, err in typed.ran)
    assert executions(f"sqlite:///{tmp_path / 'jobrunner.db'}") == [
        (JOB, "succeeded", 1, {"signup_id": 1, "message_id": "msg-1"}),
        (JOB, "succeeded", 2, {"signup_id": 2, "message_id": "msg-2"}),
    ]


@pytest.fixture
def pg_database(pg_server: sa.URL) -> Iterator[sa.URL]:
    """An empty scratch database: the `jobs` database that `createdb` makes on the page."""
    with scratch_database(pg_server, prefix="jobrunner_quickstart") as url:
        yield url


@pytest.mark.postgres
def test_quickstart_postgres_section_runs_as_written(
    tmp_path: Path, pg_database: sa.URL
) -> None:
    """Step 6 against a scratch database: the job submitted there is run there."""
    plain = pg_database.set(drivername="postgresql").render_as_string(hide_password=False)
    typed = run_quickstart(tmp_path, postgres_url=plain)

    [pg_id] = typed.stdout("python welcome.py ada@example.com")
    pg_id = str(uuid.UUID(pg_id.strip()))
    [ran] = typed.stderr("jobrunner --app jobs worker --until-idle")
    assert f"execution {pg_id} of {JOB} succeeded (attempt 1)" in ran
    [table] = typed.stdout("jobrunner list")
    assert listed(table, pg_id, "succeeded")
    assert not (tmp_path / "jobrunner.db").exists()  # nothing went to the SQLite default
    pg_url = pg_database.set(drivername="postgresql+psycopg")
    assert executions(pg_url.render_as_string(hide_password=False)) == [
        (JOB, "succeeded", 1, {"signup_id": 1, "message_id": "msg-1"}),
    ]
