"""Implicit differentiation through fixed points, as PyTorch autograd layers.

``fixed_point_layer(Phi, solver=..., backward=...)`` returns a layer whose output ``w*`` solves
``w* = Phi(w*, *params)`` and whose backward solves one linear system at ``w*`` instead of
backpropagating through the iterations.
"""

from importlib.metadata import PackageNotFoundError, version

from ._argmin_layer import ArgminLayer, argmin_layer
from ._bilevel import BilevelLog, BilevelTrainer
from ._fixed_point_layer import FixedPointLayer, fixed_point_layer
from ._forward import Anderson, Broyden, FixedPoint, ForwardSolver
from ._functional_optim import FunctionalOptimizer, adam, gradient_step, sgd
from ._hypergradient import FiniteDifference, HypergradientMethod, StochasticAID, hypergradient
from ._implicit_layer import ImplicitLayer, SolveInfo
from ._linear import CG, GMRES, BiCGSTAB, Direct, LinearSolver, Neumann, NormalCG, Nystrom
from ._minimize import LBFGS, GradientDescent, Minimizer
from ._operator import FunctionOperator, LinearOperator, MatrixOperator
from ._records import ConvergenceError, ConvergenceWarning, SolveRecord, Status
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
