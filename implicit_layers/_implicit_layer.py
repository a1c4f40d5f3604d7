"""The autograd machinery every implicit layer shares.

An implicit layer's output ``w*`` solves ``F(w*, *params) = 0``. A subclass says how to find
``w*`` (:meth:`ImplicitLayer._find`) and what ``F`` is (:meth:`ImplicitLayer._residual`); this
module runs the forward with no graph, records it, and differentiates it implicitly.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._implicit import ImplicitOperator, Residual, ResidualGraph
from ._linear import LinearSolver, as_linear_solver
from ._records import ON_FAILURE_CHOICES, OnFailure, SolveRecord, Status, report
from ._tree import FlatSpace, tree_flatten, tree_unflatten

__all__ = ["ImplicitLayer", "SolveInfo"]


@dataclass
class SolveInfo:
    """The records of one call of a layer: ``forward`` at once, ``backward`` once it has run
    (the latest, if the graph is differentiated more than once)."""

    forward: SolveRecord | None = None
    backward: SolveRecord | None = None


class ImplicitLayer(nn.Module, abc.ABC):
    """Base of the layers whose output ``w*`` solves ``F(w*, *params) = 0``.

    The forward finds ``w*`` from ``w0`` with no graph kept. The backward, given
    ``b = dL/dw*``, solves ``F_w^T x = b`` with ``backward`` from one evaluation of ``F`` with a
    graph, and each param that requires grad receives ``-F_p^T x``. ``layer.last_forward`` and
    ``layer.last_backward`` hold the records of the most recent solves; :meth:`solve` returns a
    per-call :class:`SolveInfo`. A forward stopped by a NaN/Inf returns NaN (after the
    ``on_failure`` policy), so the failure reaches the loss. With ``warm_start=True`` each
    backward solve starts from the previous backward's solution (when its shape matches): in
    a training loop the system changes slowly, so fewer products are needed (the initial
    residual costs one). A failed solve warns (``on_failure="warn"``), raises
    ``ConvergenceError`` (``"raise"``) or is only recorded (``"ignore"``).
    """

    def __init__(
        self,
        function: Callable[..., Any],
        solver: Any,
        backward: LinearSolver | Callable,
        on_failure: OnFailure,
        warm_start: bool = False,
    ):
        super().__init__()
        if not callable(function):
            raise TypeError(
                f"`{self._function_name}` must be callable as {self._function_name}(w, *params), "
                f"got {type(function).__name__}."
            )
        if on_failure not in ON_FAILURE_CHOICES:
            raise ValueError(
                f"`on_failure` must be one of {', '.join(map(repr, ON_FAILURE_CHOICES))}; "
                f"got {on_failure!r}."
            )
        if not (isinstance(solver, self._solver_type) or callable(solver)):
            raise TypeError(
                f"`solver` must be a {self._solver_type.__name__} ({self._solver_examples}) or a "
                f"callable (f, w0) -> w; got {type(solver).__name__}."
            )
        setattr(self, self._function_name, function)  # an nn.Module becomes a submodule
        self.solver = solver
        self.backward_solver = as_linear_solver(backward)
        self.on_failure = on_failure
        self.warm_start = bool(warm_start)
        self._previous_backward: torch.Tensor | None = None
        self.last_forward: SolveRecord | None = None
        self.last_backward: SolveRecord | None = None

    _function_name = "function"
    _start_name = "w0"  # what the initial guess is called in messages
    _solver_type: type = object  # the solver objects a subclass accepts, besides callables
    _solver_examples = ""

    @property
    def function(self) -> Callable[..., Any]:
        """The user's function: ``phi`` of a fixed point, ``f`` of an argmin."""
        return getattr(self, self._function_name)

    def forward(self, w0: Any, *params: Any) -> Any:
        """The solution ``w*``, with the structure of ``w0``."""
        return self.solve(w0, *params)[0]

    def solve(self, w0: Any, *params: Any) -> tuple[Any, SolveInfo]:
        """Like calling the layer, and also return this call's :class:`SolveInfo`."""
        space = FlatSpace(w0, self._start_name)
        call = _Call(self, space, params)
        w_star = _ImplicitFunction.apply(call, space.flatten(w0).detach(), *call.tensors)
        del call.tensors  # the backward reads the saved tensors: keep no other reference
        return space.unflatten(w_star), call.info

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, backward={self.backward_solver!r}"

    @abc.abstractmethod
    def _find(
        self, function: Callable[..., Any], space: FlatSpace, params: tuple, w0: torch.Tensor
    ) -> tuple[torch.Tensor, SolveRecord]:
        """``w*`` as a flat vector from the flat ``w0``, and the record of the search.

        ``function`` is the user's function with every tensor it could reach detached, so an
        inner loop that calls ``.backward()`` cannot touch the gradients of the caller's tensors.
        """

    @abc.abstractmethod
    def _residual(self, space: FlatSpace) -> Residual:
        """``G(w, *params)`` as a list of leaves matching ``w``: ``F = w - G`` when the class
        sets ``_identity_minus`` (a fixed point), else ``F = G``."""

    _identity_minus = False

    def _rows(self, space: FlatSpace) -> int:
        """How many independent rows ``w`` holds (a batch of samples that never mix)."""
        return 1


def poisoned_if_nonfinite(w_star: torch.Tensor, record: SolveRecord) -> torch.Tensor:
    """All NaN when a NaN/Inf stopped the solve: the point the solver kept is finite, but
    handing it back (and a gradient taken there) would hide the failure from the loss, from a
    NaN check and from AMP's GradScaler."""
    if record.status is Status.NONFINITE:
        return torch.full_like(w_star, math.nan)
    return w_star


class _Call:
    """Everything one call of a layer needs in its forward and backward (nothing is kept on
    the layer but the latest records)."""

    def __init__(self, layer: ImplicitLayer, space: FlatSpace, params: tuple):
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
        if isinstance(layer.function, nn.Module):
            own = [p for p in layer.function.parameters() if p.requires_grad]
        self.n_explicit = len(explicit)
        self.tensors = explicit + own

    def params(self, tensors: Sequence[torch.Tensor]) -> tuple:
        """The params tuple for the user's function, with ``tensors`` in the tensor slots."""
        leaves = list(self.constants)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        return tree_unflatten(self.param_spec, leaves)

    def solve_forward(self, w0: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        detached = [t.detach() for t in tensors]
        function = self.layer.function
        if isinstance(function, nn.Module):
            state = {name: p.detach() for name, p in function.named_parameters()}
            module = function

            def function(*args: Any) -> Any:
                return torch.func.functional_call(module, state, args)

        params = self.params(detached[: self.n_explicit])
        w_star, record = self.layer._find(function, self.space, params, w0)
        self.info.forward = self.layer.last_forward = record
        report(record, "forward", self.layer.on_failure)
        w_star = poisoned_if_nonfinite(w_star, record)
        if w_star.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr():
            w_star = w_star.clone()  # never hand back (a view of) the caller's w0
        return w_star

    def solve_backward(
        self, w_star: torch.Tensor, tensors: Sequence[torch.Tensor], needs: Sequence[bool], b
    ) -> list[torch.Tensor | None]:
        graph = ResidualGraph(
            self.layer._residual(self.space),
            self.space,
            self.params,
            w_star,
            tensors,
            needs,
            self.n_explicit,
            self.layer._identity_minus,
        )
        b = b.reshape(-1)
        layer, x0 = self.layer, None
        previous = layer._previous_backward
        if layer.warm_start and previous is not None and previous.shape == b.shape:
            x0 = previous.to(dtype=b.dtype, device=b.device)
        operator = ImplicitOperator(graph, layer._rows(self.space))
        x, record = layer.backward_solver.solve(operator, b, x0)
        if layer.warm_start:
            layer._previous_backward = x.detach()
        self.info.backward = self.layer.last_backward = record
        report(record, "backward", self.layer.on_failure)
        return graph.param_grads(x)


class _ImplicitFunction(torch.autograd.Function):
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
                "an implicit layer's backward is not differentiable yet: a backward with "
                "create_graph=True would silently drop the second-order terms through the layer. "
                "Run the backward without create_graph=True."
            )
        w_star, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if not any(needs):
            return (None, None, *([None] * len(tensors)))
        return (None, None, *ctx.call.solve_backward(w_star, tensors, needs, grad))
