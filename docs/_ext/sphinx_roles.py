"""Griffe extension: render the package's Sphinx-style roles as Markdown for mkdocstrings.

The docstrings use ``:class:`PhasedJob``` and friends (readable in ``help()``); mkdocstrings
renders Markdown, where those roles would show up literally. A role naming a public
``jobrunner`` object becomes a cross-reference; anything else becomes inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import jobrunner

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|mod|data|obj):`(~?)([\w.]+)`")
_PUBLIC = frozenset(jobrunner.__all__)


def _replace(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2)
    target = target.removeprefix("jobrunner.")
    label = target.rsplit(".", 1)[-1] if short else target
    if target.split(".", 1)[0] in _PUBLIC:
        return f"[`{label}`][jobrunner.{target}]"
    return f"`{label}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)
