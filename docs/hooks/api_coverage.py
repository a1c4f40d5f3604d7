"""mkdocs hook: every public name must have a ``::: module.name`` entry in ``docs/api/``.

The public names are the ``__all__`` lists of ``implicit_layers``, ``implicit_layers.nn``,
``implicit_layers.optim`` and ``implicit_layers.testing``, read from their ``__init__.py``
without importing them. A missing entry is logged as a warning, which fails
``mkdocs build --strict``; so does an entry for a name that is no longer public.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.api_coverage")

PACKAGES = ("implicit_layers", "implicit_layers.nn", "implicit_layers.optim")
PACKAGES += ("implicit_layers.testing",)
ENTRY = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)


def public_names(root: Path) -> set[str]:
    names = set()
    for package in PACKAGES:
        init = root.joinpath(*package.split("."), "__init__.py")
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                names |= {f"{package}.{e.value}" for e in node.value.elts}
    return names


def on_post_build(config, **kwargs) -> None:
    docs = Path(config["docs_dir"])
    documented = set()
    for page in (docs / "api").glob("*.md"):
        documented |= set(ENTRY.findall(page.read_text()))
    expected = public_names(docs.parent)
    for name in sorted(expected - documented):
        log.warning(f"api_coverage: {name} is public but has no '::: {name}' in docs/api/")
    for name in sorted(documented - expected):
        log.warning(f"api_coverage: docs/api/ documents {name}, which is not in any __all__")
