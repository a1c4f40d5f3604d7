"""``fixed_point_layer``: a fixed point ``w* = Phi(w*, *params)`` as a differentiable layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._forward import Anderson, ForwardSolver, as_forward_solver
from ._implicit import ImplicitOperator, PhiGraph
from ._linear import GMRES, LinearSolver, as_linear_solver
from ._records import ON_FAILURE_CHOICES, OnFailure, SolveRecord, report
from ._tree import FlatSpace, tree_flatten, tree_unflatten

__all__ = ["fixed_point_layer", "FixedPointLayer", "SolveInfo"]

# Solvers are immutable, so one default instance can serve every layer.
DEFAULT_SOLVER = Anderson()
DEFAULT_BACKWARD = GMRES()  # valid for any map, unlike CG


@dataclass
class SolveInfo:
    """The records of one call of a layer: ``forward`` at once, ``backward`` once it has run
    (the latest, if the graph is differentiated more than once)."""

    forward: SolveRecord | None = None
    backward: SolveRecord | None = None


class FixedPointLayer(nn.Module):
    """A layer returning the fixed point ``w* = Phi(w*, *params)``, differentiable in ``params``.

    Forward: ``solver`` iterates ``w -> Phi(w, *params)`` from ``w0`` with no graph kept (Phi runs
    under ``torch.no_grad()``; a Phi that takes gradients inside must enable them itself).
    Backward: with ``b = dL/dw*``, ``backward`` solves ``(I - J)^T x = b`` for
    ``J = dPhi/dw`` at ``(w*, params)``, using vector-Jacobian products from a single evaluation
    of Phi with a graph, and each param that requires grad receives ``(dPhi/dparam)^T x``.

    * ``w0`` is a floating-point tensor or a pytree (nested tuple/list/dict) of tensors of one
      dtype and device; a leading batch dimension is just part of the vector. No gradient
      flows to ``w0``: the fixed point does not depend on where the search started.
    * ``params`` may be tensors, pytrees of tensors (a dict of weights) or non-tensors, which
      are passed through as constants.
    * Tensors Phi closes over instead of taking as params would get no gradient; the backward
      raises if it finds any that require grad. Pass them as params, or make Phi an
      ``nn.Module``: its parameters are then inputs of the layer and get gradients.
    * Records: ``layer.last_forward`` and ``layer.last_backward`` hold the records of the most
      recent solves; :meth:`solve` returns a per-call :class:`SolveInfo`. A failed solve (budget
      exhausted, NaN/Inf) warns (``on_failure="warn"``), raises :class:`ConvergenceError`
      (``"raise"``) or is only recorded (``"ignore"``).

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
        backward: LinearSolver | Callable = DEFAULT_BACKWARD,
        on_failure: OnFailure = "warn",
    ):
        super().__init__()
        if not callable(phi):
            raise TypeError(f"`phi` must be callable as phi(w, *params), got {type(phi).__name__}.")
        if not (isinstance(solver, ForwardSolver) or callable(solver)):
            raise TypeError(
                "`solver` must be a forward solver (FixedPoint(), Anderson()) or a callable "
                f"(f, w0) -> w; got {type(solver).__name__}."
            )
        if on_failure not in ON_FAILURE_CHOICES:
            raise ValueError(
                f"`on_failure` must be one of {', '.join(map(repr, ON_FAILURE_CHOICES))}; "
                f"got {on_failure!r}."
            )
        self.phi = phi
        self.solver = solver
        self.backward_solver = as_linear_solver(backward)
        self.on_failure = on_failure
        self.last_forward: SolveRecord | None = None
        self.last_backward: SolveRecord | None = None

    def forward(self, w0: Any, *params: Any) -> Any:
        """The fixed point ``w*``, with the structure of ``w0``."""
        return self.solve(w0, *params)[0]

    def solve(self, w0: Any, *params: Any) -> tuple[Any, SolveInfo]:
        """Like calling the layer, and also return this call's :class:`SolveInfo`."""
        space = FlatSpace(w0, "w0")
        call = _Call(self, space, params)
        w_star = _FixedPointFunction.apply(call, space.flatten(w0).detach(), *call.tensors)
        return space.unflatten(w_star), call.info

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward_solver!r}"


class _Call:
    """Everything one call of a layer needs in its forward and backward (nothing is kept on
    the layer but the latest records)."""

    def __init__(self, layer: FixedPointLayer, space: FlatSpace, params: tuple):
        self.layer, self.space, self.info = layer, space, SolveInfo()
        leaves, self.param_spec = tree_flatten(params)
        self.tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        explicit = [leaves[i] for i in self.tensor_slots]
        for slot, tensor in zip(self.tensor_slots, explicit):
            if tensor.ndim > 0 and tensor.device != space.device:
                raise ValueError(
                    f"params leaf {slot} is on {tensor.device} but `w0` is on {space.device}; "
                    "move them to one device."
                )
        own = []
        if isinstance(layer.phi, nn.Module):
            own = [p for p in layer.phi.parameters() if p.requires_grad]
        self.n_explicit = len(explicit)
        self.tensors = explicit + own

    def params(self, tensors: Sequence[torch.Tensor]) -> tuple:
        """The params tuple for Phi, with ``tensors`` in the tensor slots."""
        leaves = list(self.constants)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        return tree_unflatten(self.param_spec, leaves)

    def phi_map(self, tensors: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``w -> Phi(w, *params)`` on flat vectors, checking Phi's output against ``w0``."""
        phi, space, params = self.layer.phi, self.space, self.params(tensors)

        def f(w: torch.Tensor) -> torch.Tensor:
            out = phi(space.unflatten(w), *params)
            return space.flatten_leaves(space.check(out, "Phi's output"))

        return f

    def solve_forward(self, w0: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        solver = as_forward_solver(self.layer.solver, self.space)
        w_star, record = solver.solve(self.phi_map(tensors), w0)
        self.info.forward = self.layer.last_forward = record
        report(record, "forward", self.layer.on_failure)
        if w_star.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr():
            w_star = w_star.clone()  # never hand back (a view of) the caller's w0
        return w_star

    def solve_backward(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool], b
    ) -> list[torch.Tensor | None]:
        graph = PhiGraph(
            self.layer.phi, self.space, self.params, w_star, tensors, needs, self.n_explicit
        )
        x, record = self.layer.backward_solver.solve(ImplicitOperator(graph), b.reshape(-1))
        self.info.backward = self.layer.last_backward = record
        report(record, "backward", self.layer.on_failure)
        return graph.param_grads(x)


class _FixedPointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, w0: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        w_star = call.solve_forward(w0, tensors)
        ctx.call = call
        ctx.save_for_backward(w_star, *tensors)
        return w_star

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fixed_point_layer's backward is not differentiable yet: a backward with "
                "create_graph=True would silently drop the second-order terms through the layer. "
                "Run the backward without create_graph=True."
            )
        w_star, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None, None, *([None] * len(tensors)))
        return (None, None, *ctx.call.solve_backward(w_star, tensors, needs, grad))


def fixed_point_layer(
    phi: Callable[..., Any] | None = None,
    /,
    *,
    solver: ForwardSolver | Callable = DEFAULT_SOLVER,
    backward: LinearSolver | Callable = DEFAULT_BACKWARD,
    on_failure: OnFailure = "warn",
):
    """Make a :class:`FixedPointLayer` from ``phi(w, *params)``; also usable as a decorator.

    ``solver`` finds the fixed point: :class:`Anderson` (default), :class:`FixedPoint`, or a
    callable ``solver(f, w0) -> w`` such as a user's own inner training loop. ``backward`` solves
    ``(I - J)^T x = dL/dw*``: :class:`GMRES` (default, valid for any map), :class:`BiCGSTAB`,
    :class:`Neumann`, :class:`NormalCG`, :class:`Direct`, :class:`CG` (only when ``I - J`` is
    symmetric positive definite, as for gradient steps ``Phi = w - a grad f``), or a callable
    ``backward(matvec, b) -> x``.

    >>> @fixed_point_layer(solver=FixedPoint(tol=1e-8), backward=Neumann())
    ... def halfway(w, target):
    ...     return 0.5 * (w + target)
    >>> target = torch.tensor([2.0], requires_grad=True)
    >>> w = halfway(torch.zeros(1), target)
    >>> w.backward()
    >>> round(w.item(), 4), round(target.grad.item(), 4)
    (2.0, 1.0)
    """

    def make(function: Callable[..., Any]) -> FixedPointLayer:
        return FixedPointLayer(function, solver=solver, backward=backward, on_failure=on_failure)

    return make if phi is None else make(phi)
