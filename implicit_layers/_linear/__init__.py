"""Backward linear solvers: one method per module, all built on :mod:`._base`."""

from ._base import IterativeLinearSolver, LinearSolver, UserLinearSolver
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
    "BiCGSTAB",
    "CG",
    "Direct",
    "GMRES",
    "Neumann",
    "NormalCG",
    "Nystrom",
]
