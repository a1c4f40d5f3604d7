"""``fixed_point_layer``: a fixed point ``w* = Phi(w*, *params)`` as a differentiable layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._forward import Anderson, ForwardSolver, as_forward_solver
from .._linear import GMRES
from .._records import OnFailure
from .._tree import FlatSpace
from ._core import Equation, ImplicitLayer, checked_call, made_or_decorator, solve_on_rows
from ._residual import FIXED_POINT

__all__ = ["fixed_point_layer", "FixedPointLayer", "FixedPointEquation"]

# Solvers are immutable, so one default instance can serve every layer.
DEFAULT_SOLVER = Anderson()
DEFAULT_BACKWARD = GMRES()  # valid for any map, unlike CG


class FixedPointEquation(Equation):
    """``w = Phi(w, *params)``: ``F = w - Phi``; the forward solver iterates ``Phi``."""

    form = FIXED_POINT
    kind = "fixed-point"
    has_map = True
    solver_type = ForwardSolver
    solver_examples = "FixedPoint(), Anderson()"

    def __init__(self, function_name: str = "phi", start_name: str = "w0", output="Phi's output"):
        self.function_name, self.start_name, self.output_name = function_name, start_name, output

    def step_map(self, space: FlatSpace, phi: Callable, params: tuple):
        def step(w: torch.Tensor) -> torch.Tensor:
            return space.flatten_leaves(
                space.check(
                    checked_call(phi, self.function_name, w, space, *params), self.output_name
                )
            )

        return step

    def find(self, solver, phi, space, params, w0):
        step = self.step_map(space, phi, params)
        return solve_on_rows(as_forward_solver(solver, space, params=params), step, space, w0)

    def residual(self, space, phi):
        def residual(w, *params):
            return space.check(phi(w, *params), self.output_name)

        return residual


class FixedPointLayer(ImplicitLayer):
    """A layer returning the fixed point ``w* = Phi(w*, *params)``, differentiable in ``params``.

    Forward: ``solver`` iterates ``w -> Phi(w, *params)`` from ``w0`` with no graph kept (Phi runs
    under ``torch.no_grad()``; a Phi that takes gradients inside, as HyperTorch's maps do, is
    run with them enabled).
    Backward: with ``b = dL/dw*``, ``backward`` solves ``(I - J)^T x = b`` for
    ``J = dPhi/dw`` at ``(w*, params)``, using vector-Jacobian products from a single evaluation
    of Phi with a graph, and each param that requires grad receives ``(dPhi/dparam)^T x``; or
    ``backward`` is :class:`Phantom`, :func:`JacobianFree` or :class:`Unrolled`.

    * ``w0`` is a floating-point or complex tensor or a pytree (nested tuple/list/dict) of
      tensors of one dtype and device (complex: see the Concepts page; the backward's Krylov
      and direct solvers need Phi holomorphic in ``w``, and check). With ``per_sample=False``
      (default) a leading batch dimension is just part of the vector; with
      ``per_sample=True`` every leaf's first dimension is a batch of independent samples, each
      judged, stopped and recorded on its own (as in a DEQ). No gradient flows to ``w0``: the
      fixed point does not depend on where the search started.
    * ``params`` may be tensors, pytrees of tensors (a dict of weights) or non-tensors, which
      are passed through as constants.
    * Tensors Phi closes over instead of taking as params would get no gradient; the backward
      raises if it finds any that require grad. Pass them as params, or make Phi an
      ``nn.Module``: its parameters are then inputs of the layer and get gradients.
    * Records: ``layer.last_forward`` and ``layer.last_backward`` hold the records of the
      calling thread's latest solves; :meth:`solve` returns a per-call :class:`SolveInfo`. A
      failed solve (budget exhausted, NaN/Inf) warns (``on_failure="warn"``), raises
      :class:`ConvergenceError` (``"raise"``) or is only recorded (``"ignore"``).

    >>> A = torch.tensor([[0.5, 0.1], [0.0, 0.3]])
    >>> layer = fixed_point_layer(lambda w, c: A @ w + c)
    >>> c = torch.ones(2, requires_grad=True)
    >>> w = layer(torch.zeros(2), c)
    >>> w.sum().backward()
    >>> torch.allclose(c.grad, torch.linalg.solve((torch.eye(2) - A).T, torch.ones(2)))
    True
    >>> layer.last_forward.converged, layer.last_backward.method
    (True, 'GMRES')
    """

    def __init__(
        self,
        phi: Callable[..., Any],
        solver: ForwardSolver | Callable = DEFAULT_SOLVER,
        backward: Any = DEFAULT_BACKWARD,
        on_failure: OnFailure = "warn",
        warm_start: bool = False,
        per_sample: bool = False,
        *,
        equation: FixedPointEquation | None = None,
    ):
        super().__init__(
            equation or FixedPointEquation(),
            phi,
            solver,
            backward,
            on_failure,
            warm_start,
            per_sample,
        )


def fixed_point_layer(
    phi: Callable[..., Any] | None = None,
    /,
    *,
    solver: ForwardSolver | Callable = DEFAULT_SOLVER,
    backward: Any = DEFAULT_BACKWARD,
    on_failure: OnFailure = "warn",
    warm_start: bool = False,
    per_sample: bool = False,
):
    """Make a :class:`FixedPointLayer` from ``phi(w, *params)``; also usable as a decorator.

    ``solver`` finds the fixed point: :class:`Anderson` (default), :class:`FixedPoint`,
    :class:`Broyden`, :class:`Newton`, or a callable ``solver(f, w0) -> w`` such as a user's own
    inner training loop (``f`` has the params bound; a callable that takes them too, ``solver(f,
    w0, *params)``, receives them). ``backward`` says how to differentiate: a linear solver for
    ``(I - J)^T x = dL/dw*`` (:class:`GMRES`, default, valid for any map; :class:`BiCGSTAB`,
    :class:`Neumann`, :class:`NormalCG`, :class:`Direct`; :class:`CG` only when ``I - J`` is
    symmetric positive definite, as for gradient steps ``Phi = w - a grad f``), a forward solver
    on the adjoint fixed point, a callable ``backward(matvec, b) -> x``, or :class:`Phantom`,
    :func:`JacobianFree`, :class:`Unrolled`. ``per_sample=True`` judges each sample of a leading
    batch dimension on its own.

    >>> @fixed_point_layer(solver=FixedPoint(tol=1e-8), backward=Neumann())
    ... def halfway(w, target):
    ...     return 0.5 * (w + target)
    >>> target = torch.tensor([2.0], requires_grad=True)
    >>> w = halfway(torch.zeros(1), target)
    >>> w.backward()
    >>> round(w.item(), 4), round(target.grad.item(), 4)
    (2.0, 1.0)
    """

    return made_or_decorator(
        FixedPointLayer,
        phi,
        solver=solver,
        backward=backward,
        on_failure=on_failure,
        warm_start=warm_start,
        per_sample=per_sample,
    )
