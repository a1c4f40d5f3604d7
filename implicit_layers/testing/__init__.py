"""Property-test implicit layers against finite differences, with hypothesis.

:func:`check_gradients` compares a layer's backward with central differences of its re-solved
forward along random directions, with a tolerance derived from the solvers' tolerances and the
conditioning. The strategies draw problems whose contraction or condition number is known:
:func:`affine_maps` and :func:`tanh_maps` for ``fixed_point_layer``, :func:`quadratic_problems`
and :func:`logistic_problems` for ``argmin_layer``, and :func:`deq_cells` for a deep-equilibrium
``nn.Module`` cell. This subpackage needs ``hypothesis`` (``pip install hypothesis``);
``implicit_layers`` itself does not.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "implicit_layers.testing needs hypothesis: pip install hypothesis "
        "(or pip install 'implicit-layers[test]'). implicit_layers itself works without it."
    ) from error

from ._check import check_gradients
from ._problems import ArgminProblem, DEQProblem, FixedPointProblem
from ._report import DirectionCheck, GradientCheck, GradientCheckError
from ._strategies import affine_maps, deq_cells, logistic_problems, quadratic_problems, tanh_maps

__all__ = [
    "check_gradients",
    "GradientCheck",
    "DirectionCheck",
    "GradientCheckError",
    "affine_maps",
    "tanh_maps",
    "quadratic_problems",
    "logistic_problems",
    "deq_cells",
    "FixedPointProblem",
    "ArgminProblem",
    "DEQProblem",
]
