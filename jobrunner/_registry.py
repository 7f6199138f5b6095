"""Registry: job names and handler paths (``"pkg.module:Class"``) to job classes."""

from __future__ import annotations

import difflib
import importlib
import threading
from collections.abc import Iterable, Iterator

from ._exceptions import JobDefinitionError, JobNotFound
from ._job import PhasedJob

JobRef = type[PhasedJob] | str


class Registry:
    """Maps job names and handler paths to :class:`PhasedJob` classes.

    Classes are registered explicitly (``registry.register(MyJob)``, usable as a class
    decorator), by being defined (subclasses register in :data:`default_registry`), or
    the first time *your code* hands a runner the class or its handler path.

    What comes from data — an execution row's handler, a Celery message's job, a stored
    schedule — is never imported unless its module is under a prefix the application
    allows (``Registry(allow_imports=["myapp.jobs"])`` or :meth:`allow_imports`):
    anything else must be registered in the process that runs it (``--app``). A row
    whose handler names any module cannot make a worker import it.
    """

    def __init__(
        self, jobs: list[type[PhasedJob]] | None = None, *, allow_imports: Iterable[str] = ()
    ) -> None:
        self._by_name: dict[str, type[PhasedJob]] = {}
        self._by_handler: dict[str, type[PhasedJob]] = {}
        self._allowed: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self.allow_imports(*allow_imports)
        for job in jobs or ():
            self.register(job)

    def allow_imports(self, *prefixes: str) -> None:
        """Let stored handlers under these module prefixes be imported when first needed.

        ``"myapp.jobs"`` allows ``myapp.jobs`` and its submodules (``myapp.jobs.email``),
        not ``myapp.jobsite``.
        """
        for prefix in prefixes:
            cleaned = prefix.strip().rstrip(".")
            if not cleaned or not all(part.isidentifier() for part in cleaned.split(".")):
                raise JobDefinitionError(
                    f"allow_imports: {prefix!r} is not a module prefix like 'myapp.jobs'"
                )
            self._allowed = (*self._allowed, cleaned)

    def register(self, job: type[PhasedJob]) -> type[PhasedJob]:
        """Add ``job``; returns it so this works as a class decorator."""
        if not (isinstance(job, type) and issubclass(job, PhasedJob)) or not hasattr(job, "spec"):
            raise JobDefinitionError(f"{job!r} is not a concrete PhasedJob subclass")
        with self._lock:
            known = self._by_name.get(job.name)
            if known is not None and known is not job and known.handler != job.handler:
                raise JobDefinitionError(
                    f"job name {job.name!r} is already registered to {known.handler}; "
                    f"{job.handler} needs a different `name`"
                )
            self._by_name[job.name] = job
            self._by_handler[job.handler] = job
        return job

    def resolve(self, ref: JobRef) -> type[PhasedJob]:
        """The job class for a class, a registered name or a handler path."""
        if isinstance(ref, type):
            return self.register(ref)
        if not isinstance(ref, str):
            raise JobNotFound(f"a job is a PhasedJob subclass, a name or a handler path: {ref!r}")
        found = self._by_name.get(ref)
        if found is not None:
            return found
        if ":" in ref:
            return self.register(self._import(ref))
        raise JobNotFound(self._unknown_message(ref))

    def lookup(self, ref: str) -> type[PhasedJob] | None:
        """A registered job by name or handler path, or None; never imports anything."""
        return self._by_name.get(ref) or self._by_handler.get(ref)

    def resolve_row(self, name: str, handler: str) -> type[PhasedJob]:
        """The job class for a stored execution, or for a job named by a message.

        By name, else by handler among registered jobs; else the handler is imported only
        if its module is under an allowed prefix (see :meth:`allow_imports`).
        """
        found = self.lookup(name) or self.lookup(handler)
        if found is not None:
            return found
        module_name = handler.partition(":")[0]
        if module_name == "__main__":
            raise JobNotFound(main_module_message(handler))
        if not self._allows(module_name):
            raise JobNotFound(
                f"job {name!r} ({handler}) is not registered in this process, and jobrunner "
                "imports no module named by stored data; import the module defining it "
                "(`--app MODULE`, or import it where the runner is made), or allow its "
                f"package: Registry(allow_imports=[{module_name.partition('.')[0]!r}])"
            )
        return self.register(self._import(handler))

    def _allows(self, module_name: str) -> bool:
        return any(
            module_name == prefix or module_name.startswith(prefix + ".")
            for prefix in self._allowed
        )

    def __iter__(self) -> Iterator[type[PhasedJob]]:
        return iter(sorted(self._by_name.values(), key=lambda job: job.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def _import(self, handler: str) -> type[PhasedJob]:
        module_name, _, qualname = handler.partition(":")
        if not module_name or not qualname:
            raise JobNotFound(f"{handler!r} is not a handler path like 'package.module:Class'")
        if module_name == "__main__":
            raise JobNotFound(main_module_message(handler))
        if "<locals>" in qualname:
            raise JobNotFound(
                f"{handler!r} is defined inside a function and cannot be imported; "
                "register the class with this process's Registry or move it to module level"
            )
        try:
            target: object = importlib.import_module(module_name)
        except ImportError as exc:
            raise JobNotFound(
                f"cannot import module {module_name!r} for handler {handler!r}: {exc}"
            ) from exc
        for part in qualname.split("."):
            if not hasattr(target, part):
                raise JobNotFound(self._unknown_message(handler, module_name=module_name))
            target = getattr(target, part)
        if not (isinstance(target, type) and issubclass(target, PhasedJob)):
            raise JobNotFound(f"{handler!r} is not a PhasedJob subclass")
        return target

    def _unknown_message(self, ref: str, module_name: str | None = None) -> str:
        where = f"module {module_name!r} has no {ref.partition(':')[2]!r}" if module_name else ""
        candidates = list(self._by_name) + [job.handler for job in self._by_name.values()]
        close = difflib.get_close_matches(ref, candidates, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        if not close and self._by_name:
            hint = f"; known jobs: {', '.join(sorted(self._by_name))}"
        if not self._by_name and not module_name:
            hint = "; no jobs are registered (import the module defining them, e.g. --app)"
        return f"no job named {ref!r}{' (' + where + ')' if where else ''}{hint}"


def main_module_message(handler: str) -> str:
    """Why a job defined in the script being run cannot be found elsewhere, and the fix."""
    cls = handler.partition(":")[2]
    return (
        f"job {handler!r} was defined in a script run as `python script.py` (module "
        "'__main__'), which no other process (a worker, `jobrunner retry`) can import. "
        f"Move {cls} into a module of its own (e.g. jobs.py beside the script), give it a "
        f'stable `name = "..."`, import it from the script, and start workers and the CLI '
        "with `--app jobs`"
    )


#: The registry runners use unless given one.
default_registry = Registry()
