"""The jobrunner dashboard: executions, attempts, jobs and queues as live web pages.

``create_app(url_or_runner, read_only=True)`` returns a Starlette ASGI app to mount in
your own app or serve alone (``jobrunner web``). Needs ``pip install 'jobrunner[web]'``.
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"the jobrunner dashboard needs {exc.name}: pip install 'jobrunner[web]'"
    ) from exc

from ._app import create_app
from ._security import AuthHook, basic_auth

__all__ = ["AuthHook", "basic_auth", "create_app"]
