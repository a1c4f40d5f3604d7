"""Every Python block of every documentation page runs, and prints what the page shows.

A page's blocks run in order in one namespace, as a reader would paste them. A block followed by
a ``text`` block (blank lines aside) must print that text: words exactly, numbers to the digits
shown (an integer exactly; a residual below 1e-12 is rounding, and any such value matches).
A page that defines ``test_*`` functions (the testing recipes) has them called too.

    python tests/test_docs.py --write [PAGE ...]   # rewrite the text blocks from a fresh run

``--write`` also adds a text block after each block that prints and has none.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    code: str
    end: int  # where the python block's closing fence ends
    output: tuple[int, int, str] | None  # the text block after it: (start, end, text)


def blocks(page: str) -> list[Block]:
    fences = list(FENCE.finditer(page))
    found = []
    for fence, following in zip(fences, fences[1:] + [None]):
        if fence.group(1) != "python":
            continue
        output = None
        if (
            following is not None
            and following.group(1) == "text"
            and not page[fence.end() : following.start()].strip()
        ):
            output = (following.start(), following.end(), following.group(2))
        found.append(Block(fence.group(2), fence.end(), output))
    return found


def run(page_path: Path) -> list[tuple[Block, str]]:
    """Each block and what it printed, run in one namespace, from the same random state and on
    one thread (a sum's order, and so its last bits, depends on the threads)."""
    return execute(page_path)[0]


def execute(page_path: Path) -> tuple[list[tuple[Block, str]], dict]:
    """:func:`run`, and the namespace the page's blocks leave (for tests that read it)."""
    namespace: dict = {"__name__": "__docs__"}
    results = []
    torch.manual_seed(0)
    random.seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_blocks(page_path, namespace, results)
    finally:
        torch.set_num_threads(threads)
    for name, value in list(namespace.items()):
        if name.startswith("test_") and callable(value):
            value()
    return results, namespace


def _run_blocks(page_path: Path, namespace: dict, results: list) -> None:
    for index, block in enumerate(blocks(page_path.read_text())):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name = f"{page_path.relative_to(ROOT)}, block {index + 1}"
            exec(compile(block.code, name, "exec"), namespace)
        results.append((block, printed.getvalue()))


def _digits(token: str) -> float:
    """Half a unit of the last digit shown: the rounding of a printed number."""
    mantissa = re.split(r"[eE]", token)[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(re.split(r"[eE]", token)[1]) if re.search(r"[eE]", token) else 0
    return 0.5 * 10.0 ** (exponent - decimals)


def same_output(got: str, shown: str) -> str | None:
    """``None`` if ``got`` prints what ``shown`` shows, else where they differ."""
    if NUMBER.sub("#", got).split() != NUMBER.sub("#", shown).split():
        return f"the words differ:\n--- printed\n{got}--- shown\n{shown}"
    for a, b in zip(NUMBER.findall(got), NUMBER.findall(shown)):
        x, y = float(a), float(b)
        if abs(x) < 1e-12 and abs(y) < 1e-12:
            continue
        # a printed number may round the other way: allow its last digit, and one more step
        if not math.isclose(x, y, rel_tol=1e-9, abs_tol=2 * max(_digits(a), _digits(b))):
            return f"{a} printed where the page shows {b}:\n--- printed\n{got}--- shown\n{shown}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_runs_and_prints_what_the_page_shows(page: Path):
    for index, (block, printed) in enumerate(run(page), start=1):
        if block.output is not None:
            difference = same_output(printed, block.output[2])
            assert difference is None, f"{page.name}, block {index}: {difference}"


def write(page_path: Path) -> None:
    page = page_path.read_text()
    edits = []
    for block, printed in run(page_path):
        if block.output is not None:
            edits.append((block.output[0], block.output[1], f"```text\n{printed}```\n"))
        elif printed:
            edits.append((block.end, block.end, f"\n```text\n{printed}```\n"))
    for start, end, text in reversed(edits):
        page = page[:start] + text + page[end:]
    page_path.write_text(page)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"]:
        sys.exit(__doc__)
    for path in [Path(p).resolve() for p in sys.argv[2:]] or PAGES:
        print(path.relative_to(ROOT))
        write(path)
