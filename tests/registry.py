"""The one registry of solvers the tests run: each entry makes a solver for a tolerance and a
budget, and says what it needs of its system. Tests choose from it by need instead of keeping
their own lists, so a new solver is tested everywhere by adding one entry here.

Needs, from least to most demanding: ``"any"`` (any non-singular system), ``"contraction"``
(``I - A`` has spectral radius below 1: Neumann, a forward solver on the adjoint fixed point),
``"spd"`` (symmetric, or Hermitian, positive definite: CG, Nystrom). A system says which it
satisfies; a solver runs on it if its need is among them. ``real_linear`` marks the solvers that
need only real linearity (valid for a complex map that is not holomorphic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from implicit_layers import (
    CG,
    GMRES,
    Anderson,
    BiCGSTAB,
    Broyden,
    Direct,
    FixedPoint,
    Neumann,
    Newton,
    NormalCG,
    Nystrom,
)


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[float, int], Any]  # (tol, max_iter) -> solver
    needs: str = "any"
    real_linear: bool = False
    rtol: float = 1e-8  # the relative gradient error to expect in float64 at tol 1e-12


LINEAR = (
    Entry("GMRES", lambda tol, k: GMRES(tol=tol, max_iter=k, restart=50)),
    Entry("BiCGSTAB", lambda tol, k: BiCGSTAB(tol=tol, max_iter=k)),
    Entry("NormalCG", lambda tol, k: NormalCG(tol=tol, max_iter=4 * k)),
    Entry("Direct", lambda tol, k: Direct(tol=tol)),
    Entry("Neumann", lambda tol, k: Neumann(tol=tol, max_iter=4 * k), "contraction", True),
    Entry("CG", lambda tol, k: CG(tol=tol, max_iter=k), "spd"),
    # full rank: (A + rho I)^-1, off by ~rho / lambda_min plus Woodbury's rounding ~eps / rho
    Entry("Nystrom", lambda tol, k: Nystrom(rank=k, rho=1e-8), "spd", rtol=1e-6),
)
ADJOINT = (  # forward solvers on the adjoint fixed point x = b + (I - A) x
    Entry(
        "FixedPoint (adjoint)",
        lambda tol, k: FixedPoint(tol=tol, max_iter=4 * k),
        "contraction",
        True,
    ),
    Entry("Anderson (adjoint)", lambda tol, k: Anderson(tol=tol, max_iter=k), "contraction", True),
    Entry("Broyden (adjoint)", lambda tol, k: Broyden(tol=tol, max_iter=k), "contraction", True),
)
FORWARD = (  # on a fixed point w = f(w); Newton also on a root (the others need a contraction)
    Entry("FixedPoint", lambda tol, k: FixedPoint(tol=tol, max_iter=4 * k), "contraction"),
    Entry("Anderson", lambda tol, k: Anderson(tol=tol, max_iter=k), "contraction"),
    Entry("Broyden", lambda tol, k: Broyden(tol=tol, max_iter=k), "contraction"),
    Entry("Newton", lambda tol, k: Newton(tol=tol, max_iter=k)),
)

SYSTEMS = {  # what a kind of system satisfies
    "general": ("any",),
    "contraction": ("any", "contraction"),
    "spd contraction": ("any", "contraction", "spd"),
}


def choose(entries: Iterable[Entry], system: str, real_linear: bool = False) -> list[Entry]:
    """The entries that run on ``system`` (a key of :data:`SYSTEMS`); with ``real_linear``
    only those that need no complex linearity."""
    allowed = SYSTEMS[system]
    return [e for e in entries if e.needs in allowed and (e.real_linear or not real_linear)]


def backward_solvers(system: str, real_linear: bool = False) -> list[Entry]:
    return choose(LINEAR + ADJOINT, system, real_linear)


def forward_solvers(system: str) -> list[Entry]:
    return choose(FORWARD, system)


def by_name(entries: Iterable[Entry]) -> dict[str, Entry]:
    return {e.name: e for e in entries}
