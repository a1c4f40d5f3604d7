"""Implicit differentiation through fixed points, as PyTorch autograd layers.

``fixed_point_layer(Phi, solver=..., backward=...)`` returns a layer whose output ``w*`` solves
``w* = Phi(w*, *params)`` and whose backward solves one linear system at ``w*`` instead of
backpropagating through the iterations; ``argmin_layer`` and ``root_layer`` do the same for
``w* = argmin f(w*, *params)`` and ``F(w*, *params) = 0``.
"""

from importlib.metadata import PackageNotFoundError, version

from ._bilevel import BilevelLog, BilevelTrainer
from ._forward import Anderson, Broyden, FixedPoint, ForwardSolver, Newton
from ._functional_optim import FunctionalOptimizer, adam, gradient_step, sgd
from ._hypergradient import FiniteDifference, HypergradientMethod, StochasticAID, hypergradient
from ._layers import (
    ArgminLayer,
    FixedPointLayer,
    ImplicitLayer,
    JacobianFree,
    Phantom,
    RootLayer,
    Unrolled,
    argmin_layer,
    fixed_point_layer,
    root_layer,
)
from ._linear import CG, GMRES, BiCGSTAB, Direct, LinearSolver, Neumann, NormalCG, Nystrom
from ._minimize import LBFGS, GradientDescent, Minimizer
from ._operator import FunctionOperator, LinearOperator, MatrixOperator
from ._records import ConvergenceError, ConvergenceWarning, SolveInfo, SolveRecord, Status
from ._unroll import Full, Recompute, Truncated, UnrollMode, unroll

try:
    __version__ = version("implicit-layers")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "fixed_point_layer",
    "FixedPointLayer",
    "ImplicitLayer",
    "argmin_layer",
    "root_layer",
    "RootLayer",
    "Phantom",
    "JacobianFree",
    "Unrolled",
    "hypergradient",
    "HypergradientMethod",
    "FiniteDifference",
    "StochasticAID",
    "BilevelTrainer",
    "BilevelLog",
    "unroll",
    "UnrollMode",
    "Full",
    "Recompute",
    "Truncated",
    "FunctionalOptimizer",
    "sgd",
    "adam",
    "gradient_step",
    "ArgminLayer",
    "Minimizer",
    "GradientDescent",
    "LBFGS",
    "SolveInfo",
    "ForwardSolver",
    "FixedPoint",
    "Anderson",
    "Broyden",
    "Newton",
    "LinearSolver",
    "CG",
    "GMRES",
    "BiCGSTAB",
    "Neumann",
    "NormalCG",
    "Nystrom",
    "Direct",
    "LinearOperator",
    "MatrixOperator",
    "FunctionOperator",
    "SolveRecord",
    "Status",
    "ConvergenceWarning",
    "ConvergenceError",
]
