"""How a layer's output is differentiated: the one module for every way, on every layer kind.

``backward=`` takes one of these, or what converts to one:

* **implicit** (:class:`Implicit`), from a linear solver (``GMRES()``, ``CG()``, ...), an
  iterative forward solver run on the adjoint fixed point ``x = J^T x + b`` (``Anderson()``,
  ``Broyden()``, ``FixedPoint()``), or a callable ``(matvec, b) -> x``: the backward solves
  ``F_w^T x = dL/dw*`` at ``w*``, with the memory of one evaluation of the function;
* :class:`Phantom` and :func:`JacobianFree`: backpropagation through a few damped steps of the
  map from ``w*``;
* :class:`Unrolled`: backpropagation through every iteration of the forward solver.

The last two need a map ``w -> Phi(w)`` to step: a fixed-point layer (or a DEQ) has one; an
argmin or a root layer does not, and says so when the layer is made.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch

from .._compat import in_functorch_transform, under_vmap
from .._forward import Anderson, Broyden, FixedPoint, IterativeForwardSolver
from .._forward._base import step_towards
from .._linear import LinearSolver, UserLinearSolver
from .._linear.fixed_point_iteration import FixedPointIteration
from .._options import check_in_interval, check_positive_int, options

__all__ = [
    "Differentiation",
    "Implicit",
    "Phantom",
    "JacobianFree",
    "Unrolled",
    "as_differentiation",
    "implicit_solver",
]


class Differentiation(abc.ABC):
    """A way to differentiate a layer's output: :meth:`run` returns ``w*`` (flat) with the
    derivatives this way makes."""

    def check(self, equation: Any, solver: Any) -> None:  # noqa: B027 (a default, not abstract)
        """Raise if this way cannot differentiate a layer of ``equation``'s kind with
        ``solver``."""

    @abc.abstractmethod
    def run(self, call: Any, w0: torch.Tensor) -> torch.Tensor: ...


class Implicit(Differentiation):
    """Implicit differentiation: the backward solves ``F_w^T x = dL/dw*`` with
    ``linear_solver`` (what ``backward=GMRES()`` and the like make)."""

    def __init__(self, linear_solver: LinearSolver):
        self.linear_solver = linear_solver

    def __repr__(self) -> str:
        return repr(self.linear_solver)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Implicit) and other.linear_solver == self.linear_solver

    def run(self, call, w0):
        w_star = _ImplicitFunction.apply(call, w0, *call.tensors)
        if torch.is_grad_enabled() and not w_star.requires_grad and not in_functorch_transform():
            _check_closure(call, w_star)
        return w_star


def _check_closure(call: Any, w_star: torch.Tensor) -> None:
    """Raise if the function closes over a tensor that requires grad: no input of this call
    requires grad, so the backward (where the check runs otherwise) never comes, and that
    tensor would silently get no gradient. Costs one evaluation with a graph."""
    tensors = [t.detach() for t in call.tensors]
    call.graph(w_star.detach(), tensors, [False] * len(tensors))._build()


class _Stepping(Differentiation):
    """A way that backpropagates through steps of the layer's map, which it must have."""

    def check(self, equation, solver):
        if not equation.has_map:
            raise TypeError(
                f"backward={self!r} backpropagates through steps of a map w -> Phi(w), which "
                f"a {equation.kind} layer does not have; differentiate it implicitly with a "
                "linear solver (backward=GMRES(), or CG() for a symmetric positive definite "
                "system)."
            )


@options
class Phantom(_Stepping):
    """Phantom gradients (Geng et al., 2021): from ``w*`` (no graph), ``steps`` damped steps
    ``w <- (1 - damping) w + damping Phi(w)`` run with a graph, and the gradient is
    backpropagated through them alone: exactly autograd's gradient of those steps.

    This approximates the implicit gradient ``(I - J)^{-T}`` by the truncated, damped series
    ``damping sum_{i<steps} ((1 - damping) I + damping J)^{iT}`` (exact as ``steps`` grows when
    the iteration contracts). Costs ``steps`` evaluations with a graph in the forward, ``steps``
    vector-Jacobian products in the backward, and keeps ``steps`` evaluations' activations.
    The output is the last step's ``w``, within the forward tolerance of ``w*``. For
    fixed-point layers and DEQs.

    >>> layer = fixed_point_layer(lambda w, c: 0.5 * w + c, backward=Phantom(steps=2, damping=1.0))
    >>> c = torch.ones(1, requires_grad=True)
    >>> layer(torch.zeros(1), c).backward()
    >>> c.grad  # 1 + 0.5, two undamped steps; the implicit gradient is 1 / (1 - 0.5) = 2
    tensor([1.5000])
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        check_positive_int(self, "steps", self.steps)
        check_in_interval(self, "damping", self.damping, 0.0, 1.0)

    def run(self, call, w0):
        w = call.solve_forward(w0, [t.detach() for t in call.tensors])
        call.layer._latest.backward = None  # this call's backward solves nothing
        step = call.step_map(call.tensors)
        with torch.enable_grad():
            for _ in range(self.steps):
                w = step_towards(w, step(w), self.damping)
        return w


def JacobianFree() -> Phantom:
    """Jacobian-free backpropagation (Fung et al., 2022): the gradient through one step
    ``Phi(w*)``, i.e. ``(I - J)^{-T} ~ I``; :class:`Phantom` with one undamped step.

    >>> JacobianFree()
    Phantom(steps=1, damping=1.0)
    """
    return Phantom(steps=1, damping=1.0)


_UNROLLABLE = (FixedPoint, Anderson, Broyden)


@options
class Unrolled(_Stepping):
    """Backpropagation through every iteration of the forward solver, run with a graph: the
    reference that implicit differentiation avoids. Memory grows with the iterations. For
    fixed-point layers and DEQs solved by :class:`FixedPoint`, :class:`Anderson` or
    :class:`Broyden`.

    >>> layer = fixed_point_layer(lambda w, c: 0.5 * w + c, solver=FixedPoint(max_iter=3, tol=0.0),
    ...                           backward=Unrolled(), on_failure="ignore")
    >>> c = torch.ones(1, requires_grad=True)
    >>> layer(torch.zeros(1), c).backward()
    >>> c.grad  # 1 + 0.5 + 0.25: autograd through the three evaluations of Phi
    tensor([1.7500])
    """

    def check(self, equation, solver):
        super().check(equation, solver)
        if not isinstance(solver, _UNROLLABLE):
            raise TypeError(
                "backward=Unrolled() backpropagates through the forward solver's iterations, "
                "which only FixedPoint(), Anderson() and Broyden() run differentiably; got "
                f"solver={solver!r:.60}."
            )

    def run(self, call, w0):
        with torch.enable_grad():
            w = call.solve_forward(w0, call.tensors)
        call.layer._latest.backward = None  # this call's backward solves nothing
        return w


def implicit_solver(backward: LinearSolver | IterativeForwardSolver | Callable) -> LinearSolver:
    """A linear solver from a solver object, an iterative forward solver (run on the fixed point
    ``x = b + (I - A) x``) or a callable ``(matvec, b) -> x``."""
    if isinstance(backward, LinearSolver):
        return backward
    if isinstance(backward, IterativeForwardSolver):
        return FixedPointIteration(backward)
    if isinstance(backward, type):
        raise TypeError(
            f"`backward` must be a solver object: pass `{backward.__name__}()`, an instance, not "
            f"the class {backward.__name__}."
        )
    if callable(backward):
        return UserLinearSolver(backward)
    raise TypeError(
        "`backward` must be a linear solver (GMRES(), CG(), ...), an iterative forward solver "
        "(Anderson(), Broyden(), FixedPoint()), Phantom(), JacobianFree(), Unrolled() or a "
        f"callable (matvec, b) -> x; got {type(backward).__name__}."
    )


def as_differentiation(backward: Any, equation: Any, solver: Any) -> Differentiation:
    """The :class:`Differentiation` that ``backward=`` asks for, checked against the layer's
    kind and solver."""
    if isinstance(backward, Differentiation):
        differentiation = backward
    else:
        differentiation = Implicit(implicit_solver(backward))
    differentiation.check(equation, solver)
    return differentiation


class _ImplicitFunction(torch.autograd.Function):
    """The autograd node of an implicit layer: forward and backward are the call's solves."""

    @staticmethod
    def forward(call: Any, w0: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return call.solve_forward(w0, [t.detach() for t in tensors])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        call, _, *tensors = inputs
        ctx.call = call
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w_star, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None, None, *([None] * len(tensors)))
        if torch.is_grad_enabled() or in_functorch_transform():  # create_graph, torch.func
            grads = ctx.call.differentiable_backward(w_star, tensors, needs, grad)
        else:
            grads = ctx.call.solve_backward(w_star, tensors, needs, grad)
        return (None, None, *grads)

    @staticmethod
    def vmap(info, in_dims, call: Any, w0: torch.Tensor, *tensors: torch.Tensor):
        """One solve per slice: the solver decides when to stop from the values it sees, so a
        vmapped layer is a loop over the slices (``jacrev`` vmaps the backward this way)."""
        _, w0_dim, *tensor_dims = in_dims

        def pick(tensor: torch.Tensor, dim: int | None, index: int) -> torch.Tensor:
            return tensor if dim is None else tensor.select(dim, index)

        slices = [
            _ImplicitFunction.apply(
                call,
                pick(w0, w0_dim, index),
                *(pick(t, dim, index) for t, dim in zip(tensors, tensor_dims)),
            )
            for index in range(info.batch_size)
        ]
        return torch.stack(slices), 0

    @staticmethod
    def jvp(ctx, _call_tangent, _w0_tangent, *tangents: torch.Tensor | None) -> torch.Tensor:
        w_star, *tensors = ctx.saved_for_forward
        if under_vmap():  # the tangent solve reads its residuals, which vmap forbids
            raise NotImplementedError(
                "implicit layers support forward-mode AD (torch.func.jvp, forward_ad) one "
                "tangent at a time, not under vmap (torch.func.jacfwd, torch.func.hessian): use "
                "torch.func.jacrev, and jacrev(jacrev(f)) for a Hessian."
            )
        return ctx.call.solve_tangent(w_star, tensors, tangents)
