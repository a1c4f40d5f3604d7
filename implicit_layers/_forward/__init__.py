"""Forward solvers: find ``w = Phi(w, *params)``."""

from ._base import ForwardSolver, IterativeForwardSolver, UserForwardSolver, as_forward_solver
from .anderson import Anderson
from .broyden import Broyden
from .fixed_point import FixedPoint
from .newton import Newton

__all__ = [
    "ForwardSolver",
    "IterativeForwardSolver",
    "UserForwardSolver",
    "as_forward_solver",
    "Anderson",
    "Broyden",
    "FixedPoint",
    "Newton",
]
