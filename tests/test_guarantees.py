"""docs/guarantees.md stays true: every promise names tests, and every test it names exists.

The page lists each promise as a row of a ``| Promise | Proven by | Under |`` table; the
"Proven by" cell names tests as ``tests/<file>.py::<test>`` (or ``<Class>::<method>``).
Here, with ``ast`` and no pytest collection:

* a promise row that names no test fails;
* a reference to a file, function or method that does not exist fails (a test renamed,
  moved or deleted), on the guarantees page and on every other docs page and the README;
* sentences the docs audit (issue 19) found false must not come back.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARANTEES = Path("docs") / "guarantees.md"
HEADER = re.compile(r"^\|\s*Promise\s*\|\s*Proven by\s*\|\s*Under\s*\|\s*$")
#: ``tests/test_x.py::test_name`` or ``tests/test_x.py::TestClass::test_method``; a
#: parametrised id (``[sqlite]``) is caught so that it can be refused.
REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+(?:::\w+)?)(\[[^\]\s`]*\])?")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def promise_rows(text: str) -> list[tuple[int, str, str]]:
    """(line number, promise, proven-by cell) of every row of every promise table."""
    rows: list[tuple[int, str, str]] = []
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if HEADER.match(line):
            in_table = True
            continue
        if in_table and re.match(r"^\|[\s:|-]+\|$", line):  # the |---|---| line
            continue
        if in_table and line.startswith("|"):
            cells = _cells(line)
            assert len(cells) == 3, f"{GUARANTEES}:{number}: a promise row has 3 cells: {line}"
            rows.append((number, cells[0], cells[1]))
            continue
        in_table = False
    return rows


@functools.cache
def _definitions(path: Path) -> frozenset[str]:
    """Module-level functions, and ``Class::method`` for the methods of its classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.add(f"{node.name}::{item.name}")
    return frozenset(found)


def broken_reference(root: Path, path: str, name: str, param: str | None) -> str | None:
    """Why ``path::name`` names no test under ``root``, or None if it does."""
    if param:
        return f"{path}::{name}{param}: name the test without its parametrised id"
    file = root / path
    if not file.is_file():
        return f"{path}::{name}: no such file"
    if not name.split("::")[-1].startswith("test"):
        return f"{path}::{name}: not a test (its name does not start with 'test')"
    if name not in _definitions(file):
        return f"{path}::{name}: no such test in {path}"
    return None


def guarantee_problems(root: Path) -> list[str]:
    """Every way docs/guarantees.md under ``root`` breaks its own rules."""
    text = (root / GUARANTEES).read_text(encoding="utf-8")
    rows = promise_rows(text)
    problems = [] if rows else [f"{GUARANTEES}: no promise table found"]
    for number, promise, proven_by in rows:
        refs = REFERENCE.findall(proven_by)
        if not refs:
            problems.append(f"{GUARANTEES}:{number}: promise names no test: {promise}")
        for path, name, param in refs:
            if (why := broken_reference(root, path, name, param)) is not None:
                problems.append(f"{GUARANTEES}:{number}: {why}")
    return problems


def _pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def reference_problems(root: Path) -> list[str]:
    """Every ``tests/...::name`` on any docs page (and the README) that names no test."""
    problems = []
    for page in _pages(root):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for path, name, param in REFERENCE.findall(line):
                if (why := broken_reference(root, path, name, param)) is not None:
                    problems.append(f"{page.relative_to(root)}:{number}: {why}")
    return problems


def test_every_promise_names_tests_that_exist() -> None:
    """Each row of docs/guarantees.md names at least one test, and each one exists."""
    assert guarantee_problems(ROOT) == []
    assert len(promise_rows((ROOT / GUARANTEES).read_text(encoding="utf-8"))) >= 50


def test_every_test_named_on_a_docs_page_exists() -> None:
    """README.md and every docs page: a test they cite as proof is really there."""
    assert reference_problems(ROOT) == []


def test_a_renamed_test_or_a_row_without_proof_is_caught(tmp_path: Path) -> None:
    """On a copy of the page and of one test file: rename the test, drop a row's proof,
    or cite a parametrised id, and the check reports each."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / GUARANTEES, tmp_path / GUARANTEES)
    for test_file in (ROOT / "tests").glob("test_*.py"):
        shutil.copy(test_file, tmp_path / "tests" / test_file.name)
    assert guarantee_problems(tmp_path) == []

    faults = tmp_path / "tests" / "test_faults.py"
    renamed = "test_kill_9_during_execute_is_reaped_and_retried"
    faults.write_text(faults.read_text().replace(f"def {renamed}(", "def test_renamed("))
    _definitions.cache_clear()
    try:
        found = guarantee_problems(tmp_path)
    finally:
        _definitions.cache_clear()
    assert any(f"tests/test_faults.py::{renamed}: no such test" in p for p in found), found

    page = tmp_path / GUARANTEES
    page.write_text(
        page.read_text()
        + "\n| Promise | Proven by | Under |\n|---|---|---|\n"
        + "| Something nobody tested. | a feeling | — |\n"
        + "| Parametrised. | `tests/test_faults.py::test_renamed[sqlite]` | — |\n"
    )
    found = guarantee_problems(tmp_path)
    assert any("promise names no test: Something nobody tested." in p for p in found), found
    assert any("without its parametrised id" in p for p in found), found


def test_the_guarantees_page_is_in_the_site_navigation() -> None:
    """mkdocs.yml lists docs/guarantees.md, so the built site shows it."""
    assert "guarantees.md" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def _needs_postgres(path: str, name: str) -> bool:
    """Whether the test asks for PostgreSQL-only fixtures by name."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return bool({a.arg for a in node.args.args} & {"postgres", "pg_url", "pg_server"})
    return False


def test_postgres_only_proofs_say_so() -> None:
    """A row whose every proof needs PostgreSQL says (PostgreSQL) in its Under column."""
    text = (ROOT / GUARANTEES).read_text(encoding="utf-8")
    missing = []
    for line in text.splitlines():
        if not line.startswith("|") or HEADER.match(line):
            continue
        cells = _cells(line)
        if len(cells) != 3:
            continue
        refs = REFERENCE.findall(cells[1])
        if refs and all(_needs_postgres(p, n) for p, n, _ in refs) and (
            "PostgreSQL" not in cells[2]
        ):
            missing.append(cells[0])
    assert missing == []


#: Sentences the docs audit of issue 19 found false or misleading, as patterns; none may
#: come back (the changelog and the benchmarks page record history and are not checked).
FALSE_SENTENCES = {
    r"either way the execution ends `?cancelled": "a cancel does not always end cancelled",
    r"only the running execution of a `?run_due`? batch heartbeats": "run_due heartbeats",
    r"the async one picks asyncpg": "a +psycopg URL keeps psycopg under AsyncJobRunner",
    r"the (network or the )?database blinked": "a database restart is not a blink",
    r"never silently lost": "nothing re-sends without a relay",
    r"Nothing is lost: the row stays": "only while the relay runs",
    r"DatabaseUnavailable\]\[jobrunner\.DatabaseUnavailable\] ending in": "two loops: "
    "ConfigurationError",
    r"Concurrent deploys are safe": "concurrent migrate on a new SQLite file fails",
    r"under 50 ms|more than 50 ms": "the tests assert behaviour, not a time bound",
    r"all finish within seconds": "the test asserts concurrency, not a time bound",
}


@pytest.mark.parametrize("pattern", sorted(FALSE_SENTENCES))
def test_sentences_found_false_do_not_come_back(pattern: str) -> None:
    """The sentences issue 19's audit found false are gone from README.md and docs/."""
    hits = []
    for page in _pages(ROOT):
        if page.name in ("changelog.md", "benchmarks.md"):
            continue
        text = " ".join(page.read_text(encoding="utf-8").split())  # sentences span lines
        if re.search(pattern, text):
            hits.append(str(page.relative_to(ROOT)))
    assert hits == [], f"{FALSE_SENTENCES[pattern]}: {hits}"
