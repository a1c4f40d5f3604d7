"""Backward linear solvers: one method per module, all built on :mod:`._base`."""

from ._base import IterativeLinearSolver, LinearSolver, UserLinearSolver, as_linear_solver
from .bicgstab import BiCGSTAB
from .cg import CG
from .direct import Direct
from .gmres import GMRES
from .neumann import Neumann
from .normal_cg import NormalCG
from .nystrom import Nystrom

__all__ = [
    "LinearSolver",
    "IterativeLinearSolver",
    "UserLinearSolver",
    "as_linear_solver",
    "BiCGSTAB",
    "CG",
    "Direct",
    "GMRES",
    "Neumann",
    "NormalCG",
    "Nystrom",
]
