"""Inner minimizers for argmin layers: find ``argmin_w f(w, *params)``."""

from ._base import Minimizer, UserMinimizer, as_minimizer
from .gradient_descent import GradientDescent
from .lbfgs import LBFGS

__all__ = ["Minimizer", "UserMinimizer", "as_minimizer", "GradientDescent", "LBFGS"]
