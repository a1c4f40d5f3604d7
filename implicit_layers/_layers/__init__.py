"""The layers: one equation each (a fixed point, an argmin, a root), on the shared core."""

from ._core import Equation, ImplicitLayer
from ._differentiate import Differentiation, JacobianFree, Phantom, Unrolled, implicit_solver
from .argmin import ArgminLayer, argmin_layer, gradient_residual
from .fixed_point import FixedPointEquation, FixedPointLayer, fixed_point_layer
from .root import RootLayer, root_layer

__all__ = [
    "Equation",
    "ImplicitLayer",
    "Differentiation",
    "Phantom",
    "JacobianFree",
    "Unrolled",
    "implicit_solver",
    "ArgminLayer",
    "argmin_layer",
    "gradient_residual",
    "FixedPointEquation",
    "FixedPointLayer",
    "fixed_point_layer",
    "RootLayer",
    "root_layer",
]
