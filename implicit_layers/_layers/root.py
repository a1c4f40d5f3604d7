"""``root_layer``: a root ``F(w*, *params) = 0`` as a differentiable layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._forward import ForwardSolver, Newton, as_forward_solver
from .._linear import GMRES
from .._records import OnFailure
from ._core import Equation, ImplicitLayer, checked_call, made_or_decorator, solve_on_rows
from ._residual import ROOT

__all__ = ["root_layer", "RootLayer", "RootEquation"]

DEFAULT_ROOT_SOLVER = Newton()
DEFAULT_BACKWARD = GMRES()  # the Jacobian of a root is in general neither symmetric nor definite


class RootEquation(Equation):
    """``F(w, *params) = 0``: the forward solver finds the fixed point of ``w - F(w)``, whose
    residual is ``-F``; a callable solver is handed ``F`` itself."""

    form = ROOT
    kind = "root"
    function_name = "F"
    output_name = "F's output"
    solver_type = ForwardSolver
    solver_examples = "Newton(), Broyden()"

    def find(self, solver, F, space, params, w0):
        def residual(w: torch.Tensor) -> torch.Tensor:
            return space.flatten_leaves(
                space.check(checked_call(F, "F", w, space, *params), self.output_name)
            )

        def step(w: torch.Tensor) -> torch.Tensor:
            return w - residual(w)

        return solve_on_rows(as_forward_solver(solver, space, residual, params), step, space, w0)

    def residual(self, space, F):
        def residual(w, *params):
            return space.check(F(w, *params), self.output_name)

        return residual


class RootLayer(ImplicitLayer):
    """A layer returning ``w*`` with ``F(w*, *params) = 0``, differentiable in ``params``
    (jaxopt's ``custom_root``).

    Forward: ``solver`` finds the root from ``w0`` with no graph kept: :class:`Newton` (default:
    Newton-Krylov with GMRES, for any non-singular Jacobian, indefinite ones included, such as
    the KKT system of a constrained problem), :class:`Broyden`, any other forward solver (run on
    the fixed point ``w = w - F(w)``, so plain :class:`FixedPoint` needs ``I - F_w`` to
    contract), or a callable ``solver(F, w0) -> w`` (or ``solver(F, w0, *params)``). Backward:
    with ``b = dL/dw*``, ``backward`` solves ``F_w^T x = b`` by vector-Jacobian products from
    one evaluation of ``F`` with a graph, and each param receives ``-F_p^T x``. ``backward`` is
    a linear solver (:class:`GMRES` by default; :class:`CG` only for a symmetric positive
    definite ``F_w``) or a callable; phantom and unrolled gradients need a fixed-point map and
    are refused. ``w0``, params, records, ``per_sample``, ``on_failure`` and ``warm_start`` are
    as for :class:`FixedPointLayer`.

    >>> A = torch.tensor([[0.0, 2.0], [1.0, -1.0]], dtype=torch.float64)  # indefinite
    >>> layer = root_layer(lambda w, b: A @ w + 0.1 * torch.tanh(w) - b)
    >>> b = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    >>> w = layer(torch.zeros(2, dtype=torch.float64), b)
    >>> w.sum().backward()
    >>> J = A + 0.1 * torch.diag(1 - torch.tanh(w.detach()) ** 2)
    >>> torch.allclose(b.grad, torch.linalg.solve(J.T, torch.ones(2, dtype=torch.float64)))
    True
    """

    def __init__(
        self,
        F: Callable[..., Any],
        solver: ForwardSolver | Callable = DEFAULT_ROOT_SOLVER,
        backward: Any = DEFAULT_BACKWARD,
        on_failure: OnFailure = "warn",
        warm_start: bool = False,
        per_sample: bool = False,
    ):
        super().__init__(RootEquation(), F, solver, backward, on_failure, warm_start, per_sample)


def root_layer(
    F: Callable[..., Any] | None = None,
    /,
    *,
    solver: ForwardSolver | Callable = DEFAULT_ROOT_SOLVER,
    backward: Any = DEFAULT_BACKWARD,
    on_failure: OnFailure = "warn",
    warm_start: bool = False,
    per_sample: bool = False,
):
    """Make a :class:`RootLayer` from ``F(w, *params)``; also usable as a decorator.

    The state may be a pytree: below, the KKT conditions of ``min 0.5 x.Q x - c.x`` subject to
    ``A x = d``, whose Jacobian ``[[Q, A^T], [A, 0]]`` is indefinite.

    >>> Q = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    >>> A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    >>> @root_layer
    ... def kkt(state, c, d):
    ...     x, nu = state["x"], state["nu"]
    ...     return {"x": Q @ x - c + A.T @ nu, "nu": A @ x - d}
    >>> c = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> d = torch.ones(1, dtype=torch.float64)
    >>> start = {"x": torch.zeros(2, dtype=c.dtype), "nu": torch.zeros(1, dtype=c.dtype)}
    >>> state = kkt(start, c, d)
    >>> [round(v, 6) for v in state["x"].tolist()]  # x = (1/3, 2/3)
    [0.333333, 0.666667]
    >>> state["x"][0].backward()
    >>> [round(v, 6) for v in c.grad.tolist()]  # dx0/dc = (1/3, -1/3)
    [0.333333, -0.333333]
    """

    return made_or_decorator(
        RootLayer,
        F,
        solver=solver,
        backward=backward,
        on_failure=on_failure,
        warm_start=warm_start,
        per_sample=per_sample,
    )
