"""A griffe extension that renders this package's reStructuredText habits as Markdown.

The docstrings are written for reading in a terminal and for doctest: Sphinx roles
(``:class:`GMRES```), ``::`` before an indented literal block, and ``>>>`` examples. Markdown
would show the roles verbatim and turn ``>>>`` lines into nested quotes, so before mkdocstrings
renders a docstring this extension rewrites, outside code:

* ``:role:`name``` (and ``:role:`~a.b.name```) to a code span, ``name``;
* a paragraph ending in ``::`` to one ending in ``:`` (the indented block after it stays a code
  block in Markdown);
* each run of doctest lines (``>>>``, ``...`` and the output up to the next blank line) to a
  fenced ``pycon`` block.

The docstrings themselves are left as they are: they still run under ``pytest --doctest-modules``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"``{target.split('.')[-1] if tilde else target}``"


def _fence_doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        out.append(line)
        i += 1
    return out


def to_markdown(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    in_fence = False
    for line in _fence_doctests(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            out.append(line)
            continue
        if not in_fence:
            line = _ROLE.sub(_role, line)
            if line.rstrip().endswith("::") and not line.strip() == "::":
                line = line.rstrip()[:-1]
        out.append(line)
    return "\n".join(out)


class ReSTMarkup(griffe.Extension):
    """Rewrites every docstring of the loaded objects (see the module's docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
